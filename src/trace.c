/* trace: one phone's trail (see trace.h). Small by construction: at most TRACE_ROWS_MAX
 * rows of each kind; the only unbounded-looking part, the topic scan, stops at the
 * high watermarks read before it starts. */
#include "trace.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "admin_cli.h"
#include "admin_common.h"
#include "admin_kafka.h"
#include "admin_pg.h"
#include "app_status.h"
#include "dlq.h"
#include "effects.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"
#include "pg_array.h"
#include "validate.h"

struct trace_ctx {
    const struct cfg *cfg;
    const struct trace_opts *opts;
    char *err;
    size_t errlen;
    char phone[PHONE_DIGITS_MAX + 1];
    PGconn *db;
    rd_kafka_t *rk;      /* reader, assign only */
    int nparts;
    int64_t *committed;
    bool need_scan;
};

static const char *val(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : PQgetvalue(r, row, col);
}

static bool is_true(const PGresult *r, int row, int col)
{
    const char *v = val(r, row, col);
    return v && v[0] == 't';
}

/* The integer at (row, col) as JSON, dflt when NULL. */
static json_object *int_at(const PGresult *r, int row, int col, int64_t dflt)
{
    return json_object_new_int64(admin_pg_i64(val(r, row, col), dflt));
}

static void add_str(json_object *o, const char *k, const char *v)
{
    json_object_object_add(o, k, admin_json_text(v));
}

/* ------------------------------------------------------------------ the topic */

/* Reads the record at partition/offset of the topic into a JSON object; sets *state to
 * 0 found with this ce_id, 1 not there / another event, 2 expired (below the log start). */
static int read_back(struct trace_ctx *t, int32_t partition, int64_t offset, const char *ce_id,
                     json_object **out, int *state)
{
    json_object *o = json_object_new_object();
    *out = o;
    json_object_object_add(o, "topic", json_object_new_string(t->cfg->topic));
    json_object_object_add(o, "partition", json_object_new_int(partition));
    json_object_object_add(o, "offset", json_object_new_int64(offset));
    if (partition < 0 || partition >= t->nparts) {
        json_object_object_add(o, "found", json_object_new_boolean(false));
        add_str(o, "reason", "the topic has no such partition");
        *state = 1;
        return 0;
    }
    int64_t low, high;
    if (admin_watermarks(t->rk, t->cfg->topic, partition, &low, &high, t->err, t->errlen))
        return -1;
    json_object_object_add(o, "low_watermark", json_object_new_int64(low));
    json_object_object_add(o, "high_watermark", json_object_new_int64(high));
    char why[160];
    if (offset < low) {
        json_object_object_add(o, "found", json_object_new_boolean(false));
        json_object_object_add(o, "expired", json_object_new_boolean(true));
        snprintf(why, sizeof why,
                 "expired: below the log start %" PRId64 " (deleted by retention; the DB's "
                 "acknowledgement is the evidence)", low);
        add_str(o, "reason", why);
        *state = 2;
        return 0;
    }
    if (offset >= high) {
        json_object_object_add(o, "found", json_object_new_boolean(false));
        snprintf(why, sizeof why, "no such message: the partition ends at offset %" PRId64,
                 high);
        add_str(o, "reason", why);
        *state = 1;
        return 0;
    }
    struct admin_reader rd;
    if (admin_reader_open(&rd, t->rk, t->cfg->topic, partition, offset, low, high, t->err,
                          t->errlen)) {
        admin_reader_close(&rd);
        return -1;
    }
    rd_kafka_message_t *m = NULL;
    int mr = admin_reader_next(&rd, &m, t->err, t->errlen);
    admin_reader_close(&rd);
    if (mr < 0) return -1;
    if (mr == 0 || m->offset != offset) {
        if (m) rd_kafka_message_destroy(m);
        json_object_object_add(o, "found", json_object_new_boolean(false));
        add_str(o, "reason", "no message at that offset");
        *state = 1;
        return 0;
    }
    char key[64], ce[64], ts[40];
    admin_key_text(m, key, sizeof key);
    admin_header(m, CE_ID, ce, sizeof ce);
    rd_kafka_timestamp_type_t tstype;
    admin_format_ms(rd_kafka_message_timestamp(m, &tstype), ts, sizeof ts);
    rd_kafka_message_destroy(m);
    bool same = strcasecmp(ce, ce_id) == 0;
    json_object_object_add(o, "found", json_object_new_boolean(same));
    add_str(o, "timestamp", ts);
    add_str(o, "key", key);
    add_str(o, "ce_id", ce);
    json_object_object_add(o, "matches", json_object_new_boolean(same));
    if (!same) {
        snprintf(why, sizeof why, "the message there is another event (ce_id %s)",
                 ce[0] ? ce : "none");
        add_str(o, "reason", why);
    }
    *state = same ? 0 : 1;
    return 0;
}

/* Does the message's value name this phone (and show)? */
static bool value_matches(const struct trace_ctx *t, const rd_kafka_message_t *m,
                          json_object **value_out)
{
    *value_out = NULL;
    if (!m->payload || m->len == 0) return false;
    /* Cheap filter first: the digits must appear somewhere in the bytes. */
    if (!memmem(m->payload, m->len, t->phone + 3, strlen(t->phone) - 3)) return false;
    json_tokener *tok = json_tokener_new();
    if (!tok) return false;
    json_object *v = json_tokener_parse_ex(tok, m->payload, (int)m->len);
    json_tokener_free(tok);
    json_object *ph = NULL, *ev = NULL;
    char norm[PHONE_DIGITS_MAX + 1];
    bool ok = v && json_object_object_get_ex(v, "phone", &ph) &&
              json_object_is_type(ph, json_type_string) &&
              validate_phone(json_object_get_string(ph), (size_t)json_object_get_string_len(ph),
                             norm) == 0 &&
              strcmp(norm, t->phone) == 0;
    if (ok && t->opts->event_id)
        ok = json_object_object_get_ex(v, "event_id", &ev) &&
             json_object_is_type(ev, json_type_string) &&
             strcmp(json_object_get_string(ev), t->opts->event_id) == 0;
    if (!ok) {
        json_object_put(v);
        return false;
    }
    *value_out = v;
    return true;
}

struct scan {
    struct trace_ctx *t;
    const char *topic;
    bool dlq;
    json_object *matches;
};

/* A message of the scanned topic: appended to the matches when its value has the phone. */
static void scan_message(void *ud, const rd_kafka_message_t *m)
{
    struct scan *s = ud;
    json_object *value;
    if (json_object_array_length(s->matches) >= TRACE_ROWS_MAX || !value_matches(s->t, m, &value))
        return;
    json_object *o = json_object_new_object();
    char key[64], ce[64], ts[40];
    admin_key_text(m, key, sizeof key);
    admin_header(m, CE_ID, ce, sizeof ce);
    rd_kafka_timestamp_type_t tstype;
    admin_format_ms(rd_kafka_message_timestamp(m, &tstype), ts, sizeof ts);
    add_str(o, "topic", s->topic);
    json_object_object_add(o, "dlq", json_object_new_boolean(s->dlq));
    json_object_object_add(o, "partition", json_object_new_int(m->partition));
    json_object_object_add(o, "offset", json_object_new_int64(m->offset));
    add_str(o, "timestamp", ts);
    add_str(o, "key", key);
    add_str(o, "ce_id", ce);
    if (s->dlq) {
        for (size_t i = 0; i < DLQ_HEADER_COUNT; i++) {
            char hv[DLQ_HEADER_VALUE_MAX];
            if (admin_header(m, dlq_header_names[i], hv, sizeof hv))
                add_str(o, dlq_header_names[i], hv);
        }
    }
    json_object_object_add(o, "value", value);
    json_object_array_add(s->matches, o);
}

/* Searches every partition of topic (low..high) for the phone; appends to matches. */
static int scan_topic(struct trace_ctx *t, const char *topic, bool dlq, json_object *matches)
{
    struct scan s = {t, topic, dlq, matches};
    return admin_scan_topic(t->rk, topic, 0, scan_message, &s, t->err, t->errlen);
}

/* For each topic match: does its ce_id have an outbox row (and where does it say)? */
static int annotate_matches(struct trace_ctx *t, json_object *matches)
{
    size_t n = json_object_array_length(matches);
    for (size_t i = 0; i < n; i++) {
        json_object *o = json_object_array_get_idx(matches, i), *ce = NULL;
        json_object_object_get_ex(o, "ce_id", &ce);
        const char *id = json_object_get_string(ce);
        bool in_outbox = false;
        if (id && effects_is_uuid(id, strlen(id))) {
            const char *params[1] = {id};
            PGresult *r = admin_pg_exec(
                t->db,
                "SELECT o.aggregate_id, o.kafka_partition, o.kafka_offset,"
                " EXISTS (SELECT 1 FROM applications a WHERE a.id = o.aggregate_id)"
                " FROM outbox_status o WHERE o.event_id = $1::uuid",
                1, params, t->err, t->errlen);
            if (!r) return -1;
            if (PQntuples(r) == 1) {
                in_outbox = true;
                json_object_object_add(o, "application_id", int_at(r, 0, 0, -1));
                json_object_object_add(o, "application_exists",
                                       json_object_new_boolean(is_true(r, 0, 3)));
                json_object_object_add(o, "recorded_partition",
                                       val(r, 0, 1) ? int_at(r, 0, 1, -1) : NULL);
                json_object_object_add(o, "recorded_offset",
                                       val(r, 0, 2) ? int_at(r, 0, 2, -1) : NULL);
            }
            PQclear(r);
        }
        json_object_object_add(o, "in_outbox", json_object_new_boolean(in_outbox));
    }
    return 0;
}

/* ------------------------------------------------------------------ the DB */

/* Consumer-side facts of one event: processed row, effects, points, dead letters. */
static int consumer_facts(struct trace_ctx *t, const char *ce_id, json_object *o,
                          bool *processed, json_object **open_dlq)
{
    const char *params[1] = {ce_id};
    *processed = false;
    *open_dlq = NULL;

    PGresult *r = admin_pg_exec(t->db,
                                "SELECT processed_at, consumer_group, partition, \"offset\""
                                " FROM processed_events WHERE event_id = $1::uuid",
                                1, params, t->err, t->errlen);
    if (!r) return -1;
    if (PQntuples(r) == 1) {
        *processed = true;
        json_object *p = json_object_new_object();
        add_str(p, "processed_at", val(r, 0, 0));
        add_str(p, "consumer_group", val(r, 0, 1));
        json_object_object_add(p, "partition", int_at(r, 0, 2, -1));
        json_object_object_add(p, "offset", int_at(r, 0, 3, -1));
        json_object_object_add(o, "processed", p);
    } else {
        json_object_object_add(o, "processed", NULL);
    }
    PQclear(r);

    r = admin_pg_exec(t->db,
                      "SELECT effect, done, attempts, last_error, updated_at FROM event_effects"
                      " WHERE event_id = $1::uuid ORDER BY effect",
                      1, params, t->err, t->errlen);
    if (!r) return -1;
    json_object *effects = json_object_new_array();
    for (int i = 0; i < PQntuples(r); i++) {
        json_object *e = json_object_new_object();
        add_str(e, "effect", val(r, i, 0));
        json_object_object_add(e, "done", json_object_new_boolean(is_true(r, i, 1)));
        json_object_object_add(e, "attempts", int_at(r, i, 2, 0));
        add_str(e, "last_error", val(r, i, 3));
        add_str(e, "updated_at", val(r, i, 4));
        json_object_array_add(effects, e);
    }
    json_object_object_add(o, "effects", effects);
    PQclear(r);

    r = admin_pg_exec(t->db,
                      "SELECT points, created_at FROM points_ledger WHERE event_id = $1::uuid", 1,
                      params, t->err, t->errlen);
    if (!r) return -1;
    if (PQntuples(r) == 1) {
        json_object *p = json_object_new_object();
        json_object_object_add(p, "points", int_at(r, 0, 0, 0));
        add_str(p, "granted_at", val(r, 0, 1));
        json_object_object_add(o, "points", p);
    } else {
        json_object_object_add(o, "points", NULL);
    }
    PQclear(r);

    r = admin_pg_exec(t->db,
                      "SELECT id, error_class, error_message, attempts, dead_lettered_at,"
                      " replayed_at, dlq_partition, dlq_offset FROM dead_letters"
                      " WHERE event_id = $1::uuid ORDER BY id",
                      1, params, t->err, t->errlen);
    if (!r) return -1;
    json_object *dls = json_object_new_array();
    for (int i = 0; i < PQntuples(r); i++) {
        json_object *d = json_object_new_object();
        json_object_object_add(d, "id", int_at(r, i, 0, -1));
        add_str(d, "error_class", val(r, i, 1));
        add_str(d, "error_message", val(r, i, 2));
        json_object_object_add(d, "attempts", int_at(r, i, 3, 0));
        add_str(d, "dead_lettered_at", val(r, i, 4));
        add_str(d, "replayed_at", val(r, i, 5));
        json_object_object_add(d, "dlq_partition", int_at(r, i, 6, -1));
        json_object_object_add(d, "dlq_offset", int_at(r, i, 7, -1));
        if (!val(r, i, 5)) *open_dlq = d;
        json_object_array_add(dls, d);
    }
    json_object_object_add(o, "dead_letters", dls);
    PQclear(r);
    return 0;
}

static void set_status(json_object *o, const char *status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_status(json_object *o, const char *status, const char *fmt, ...)
{
    char story[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(story, sizeof story, fmt, ap);
    va_end(ap);
    json_object_object_add(o, "status", json_object_new_string(status));
    json_object_object_add(o, "story", json_object_new_string(story));
}

static const char *effects_summary(json_object *o, char *buf, size_t len)
{
    json_object *effects = NULL;
    json_object_object_get_ex(o, "effects", &effects);
    size_t n = effects ? json_object_array_length(effects) : 0, used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n && used < len; i++) {
        json_object *e = json_object_array_get_idx(effects, i), *f, *d, *a, *le;
        json_object_object_get_ex(e, "effect", &f);
        json_object_object_get_ex(e, "done", &d);
        json_object_object_get_ex(e, "attempts", &a);
        bool has_err = json_object_object_get_ex(e, "last_error", &le) && le;
        int w = snprintf(buf + used, len - used, "%s%s %s (attempts %d%s%s)", i ? "; " : "",
                         json_object_get_string(f),
                         json_object_get_boolean(d) ? "done" : "NOT done",
                         json_object_get_int(a), has_err ? ", last error: " : "",
                         has_err ? json_object_get_string(le) : "");
        if (w < 0) break;
        used += (size_t)w;
    }
    return n ? buf : "none recorded";
}

/* One outbox row: the topic record, the consumer status and the story. */
static int outbox_entry(struct trace_ctx *t, const PGresult *r, int i, json_object **out)
{
    json_object *o = json_object_new_object();
    *out = o;
    const char *ce_id = val(r, i, 0);
    int64_t app_id = admin_pg_i64(val(r, i, 1), -1);
    add_str(o, "event_id", ce_id);
    json_object_object_add(o, "application_id", json_object_new_int64(app_id));
    add_str(o, "created_at", val(r, i, 2));
    add_str(o, "published_at", val(r, i, 3));
    bool has_pos = val(r, i, 4) && val(r, i, 5);
    int32_t partition = (int32_t)admin_pg_i64(val(r, i, 4), -1);
    int64_t offset = admin_pg_i64(val(r, i, 5), -1);
    json_object_object_add(o, "partition", has_pos ? json_object_new_int(partition) : NULL);
    json_object_object_add(o, "offset", has_pos ? json_object_new_int64(offset) : NULL);
    json_object_object_add(o, "attempts", int_at(r, i, 6, 0));
    add_str(o, "last_error", val(r, i, 7));
    bool overdue = is_true(r, i, 8);

    bool processed;
    json_object *dlq;
    if (consumer_facts(t, ce_id, o, &processed, &dlq)) return -1;

    int64_t committed = has_pos && partition >= 0 && partition < t->nparts
                            ? t->committed[partition]
                            : -1;
    json_object_object_add(o, "group_committed_offset",
                           committed >= 0 ? json_object_new_int64(committed) : NULL);

    if (!val(r, i, 3)) {
        json_object_object_add(o, "topic_record", NULL);
        if (overdue)
            set_status(o, "unpublished",
                       "committed at %s but NOT published past the grace window (%d attempts%s%s): "
                       "the relay has not delivered it",
                       val(r, i, 2), (int)admin_pg_i64(val(r, i, 6), 0),
                       val(r, i, 7) ? ", last error: " : "", val(r, i, 7) ? val(r, i, 7) : "");
        else
            set_status(o, "awaiting_relay",
                       "committed at %s; the relay has not published it yet (within the grace window)",
                       val(r, i, 2));
        return 0;
    }
    if (!has_pos) {
        json_object_object_add(o, "topic_record", NULL);
        t->need_scan = true;
        set_status(o, "not_in_topic", "marked published at %s without a partition/offset",
                   val(r, i, 3));
        return 0;
    }
    json_object *rec;
    int state;
    if (read_back(t, partition, offset, ce_id, &rec, &state)) {
        json_object_object_add(o, "topic_record", rec);
        return -1;
    }
    json_object_object_add(o, "topic_record", rec);
    json_object *reason = NULL;
    json_object_object_get_ex(rec, "reason", &reason);
    if (state == 1) {
        t->need_scan = true;
        json_object *ce = NULL;
        bool other = json_object_object_get_ex(rec, "ce_id", &ce);
        set_status(o, other ? "wrong_offset" : "not_in_topic",
                   "MISSING FROM THE TOPIC: marked published at %s to %s/%d@%" PRId64 ", but %s",
                   val(r, i, 3), t->cfg->topic, (int)partition, offset,
                   json_object_get_string(reason));
        return 0;
    }
    char where[160];
    snprintf(where, sizeof where, "published to %s/%d@%" PRId64 "%s", t->cfg->topic,
             (int)partition, offset, state == 2 ? " (since expired from the topic)" : "");
    char eff[1024];
    /* processed and dead_lettered follow the one rule of app_status.h (column 10). */
    const char *status = val(r, i, 10) ? val(r, i, 10) : "";
    if (strcmp(status, "dead_lettered") == 0 && dlq) {
        json_object *cls, *msg, *at, *att;
        json_object_object_get_ex(dlq, "error_class", &cls);
        json_object_object_get_ex(dlq, "error_message", &msg);
        json_object_object_get_ex(dlq, "dead_lettered_at", &at);
        json_object_object_get_ex(dlq, "attempts", &att);
        set_status(o, "dead_lettered",
                   "%s; DEAD-LETTERED at %s after %d attempts: %s: %s (replay: ticketd dlq "
                   "replay --event-id %s)",
                   where, json_object_get_string(at), json_object_get_int(att),
                   json_object_get_string(cls), json_object_get_string(msg), ce_id);
        return 0;
    }
    if (strcmp(status, "processed") == 0) {
        json_object *p = NULL, *at = NULL;
        json_object_object_get_ex(o, "processed", &p);
        json_object_object_get_ex(p, "processed_at", &at);
        set_status(o, "processed", "%s; processed at %s; effects: %s", where,
                   json_object_get_string(at), effects_summary(o, eff, sizeof eff));
        return 0;
    }
    if (committed >= 0 && offset < committed) {
        if (processed)
            set_status(o, "effects_not_done",
                       "%s; processed, but the group committed past it (offset %" PRId64
                       ") with effects not done: %s",
                       where, committed, effects_summary(o, eff, sizeof eff));
        else
            set_status(o, "lost",
                       "%s; LOST BY THE CONSUMER: the group committed past it (offset %" PRId64
                       ") but it is neither processed nor dead-lettered",
                       where, committed);
        return 0;
    }
    if (committed >= 0)
        set_status(o, "pending", "%s; not consumed yet (the group's committed offset is %" PRId64
                   ")%s%s", where, committed, processed ? "; effects so far: " : "",
                   processed ? effects_summary(o, eff, sizeof eff) : "");
    else
        set_status(o, "pending", "%s; not consumed yet (the group has committed nothing on "
                   "partition %d)", where, (int)partition);
    return 0;
}

/* ------------------------------------------------------------------ the run */

static int trace_collect(struct trace_ctx *t, json_object *root)
{
    char grace[32];
    snprintf(grace, sizeof grace, "%" PRId64, t->cfg->audit_grace_ms);

    char retention[32];
    snprintf(retention, sizeof retention, "%" PRId64, t->cfg->outbox_retention_ms);
    const char *p3[3] = {t->phone, t->opts->event_id, retention};
    PGresult *apps = admin_pg_exec(
        t->db,
        "SELECT id, event_id, name, email, seats, idempotency_key, created_at,"
        " $3::bigint > 0 AND created_at < now() - $3::bigint * interval '1 millisecond'"
        " FROM applications WHERE phone = $1"
        " AND ($2::text IS NULL OR event_id = $2) ORDER BY id LIMIT 100",
        3, p3, t->err, t->errlen);
    if (!apps) return -1;
    int napps = PQntuples(apps);
    /* "{1,2,3}" for the outbox query. */
    struct strbuf ids;
    strbuf_init(&ids, 0);
    pg_array_open(&ids);
    for (int i = 0; i < napps; i++) pg_array_int(&ids, admin_pg_i64(PQgetvalue(apps, i, 0), -1));
    if (pg_array_close(&ids)) {
        strbuf_free(&ids);
        PQclear(apps);
        admin_set_err(t->err, t->errlen, "out of memory");
        return -1;
    }
    const char *p4[4] = {t->phone, t->opts->event_id, grace, strbuf_str(&ids)};
    PGresult *ob = admin_pg_exec(
        t->db,
        "SELECT o.event_id::text, o.aggregate_id, o.created_at, o.published_at, o.kafka_partition,"
        " o.kafka_offset, o.attempts, o.last_error,"
        " o.created_at < now() - $3::bigint * interval '1 millisecond',"
        " EXISTS (SELECT 1 FROM applications a WHERE a.id = o.aggregate_id),"
        " " APP_STATUS_SQL
        " FROM outbox_status o" APP_STATUS_JOIN_SQL "WHERE o.aggregate_id = ANY($4::bigint[])"
        " OR (o.payload->>'phone' = $1 AND ($2::text IS NULL OR o.payload->>'event_id' = $2))"
        " ORDER BY o.id LIMIT 200",
        4, p4, t->err, t->errlen);
    strbuf_free(&ids);
    if (!ob) {
        PQclear(apps);
        return -1;
    }

    int ret = -1;
    json_object *japps = json_object_new_array();
    json_object_object_add(root, "applications", japps);
    for (int i = 0; i < napps; i++) {
        json_object *a = json_object_new_object();
        json_object_array_add(japps, a);
        const char *id = PQgetvalue(apps, i, 0);
        json_object_object_add(a, "id", json_object_new_int64(admin_pg_i64(id, -1)));
        add_str(a, "event_id", val(apps, i, 1));
        add_str(a, "name", val(apps, i, 2));
        add_str(a, "email", val(apps, i, 3));
        json_object_object_add(a, "seats", int_at(apps, i, 4, 1));
        add_str(a, "idempotency_key", val(apps, i, 5));
        add_str(a, "created_at", val(apps, i, 6));
        json_object *rows = json_object_new_array();
        json_object_object_add(a, "outbox", rows);
        for (int j = 0; j < PQntuples(ob); j++) {
            if (strcmp(PQgetvalue(ob, j, 1), id) != 0) continue;
            json_object *e;
            int rc = outbox_entry(t, ob, j, &e);
            json_object_array_add(rows, e);
            if (rc) goto out;
        }
        if (json_object_array_length(rows) == 0 && is_true(apps, i, 7)) {
            set_status(a, "outbox_pruned",
                       "the application row exists (created %s); its outbox row is older than "
                       "OUTBOX_RETENTION and was pruned, so the DB no longer proves it was "
                       "published: see the topic search below",
                       val(apps, i, 6));
            t->need_scan = true;
        } else if (json_object_array_length(rows) == 0) {
            set_status(a, "no_outbox",
                       "LOST BEFORE PUBLISHING: the application row exists (created %s) but it "
                       "has no outbox row, so it was never sent to %s",
                       val(apps, i, 6), t->cfg->topic);
            t->need_scan = true;
        } else {
            /* The application's status is its latest event's. */
            json_object *last = json_object_array_get_idx(rows, json_object_array_length(rows) - 1);
            json_object *st, *story;
            json_object_object_get_ex(last, "status", &st);
            json_object_object_get_ex(last, "story", &story);
            json_object_object_add(a, "status", json_object_get(st));
            json_object_object_add(a, "story", json_object_get(story));
        }
    }
    /* Outbox rows of this phone whose application row is gone. */
    json_object *orphans = json_object_new_array();
    json_object_object_add(root, "outbox_without_application", orphans);
    for (int j = 0; j < PQntuples(ob); j++) {
        if (is_true(ob, j, 9)) continue;
        json_object *e;
        int rc = outbox_entry(t, ob, j, &e);
        json_object_array_add(orphans, e);
        if (rc) goto out;
        json_object *story;
        json_object_object_get_ex(e, "story", &story);
        char buf[1024];
        snprintf(buf, sizeof buf, "NO APPLICATION ROW (application %s is gone); the outbox row: %s",
                 PQgetvalue(ob, j, 1), json_object_get_string(story));
        json_object_object_add(e, "story", json_object_new_string(buf));
    }
    ret = napps + (int)json_object_array_length(orphans);
out:
    PQclear(apps);
    PQclear(ob);
    return ret;
}

static void render_human(json_object *root, FILE *out);

int trace_run(const struct cfg *cfg, const char *brokers, const struct trace_opts *opts,
              FILE *human_out, json_object **json_out, char *err, size_t errlen)
{
    struct trace_ctx t = {.cfg = cfg, .opts = opts, .err = err, .errlen = errlen};
    if (!opts->phone || validate_phone(opts->phone, strlen(opts->phone), t.phone) != 0) {
        snprintf(err, errlen, "bad phone: a Korean mobile number such as 010-1234-5678");
        return -2;
    }
    if (opts->event_id && !validate_event_id(opts->event_id, strlen(opts->event_id))) {
        snprintf(err, errlen, "bad event id (1-64 characters of [A-Za-z0-9._-])");
        return -2;
    }
    if (!brokers || !*brokers) {
        snprintf(err, errlen, "no Kafka brokers to read the topic from");
        return -1;
    }
    char masked[32];
    log_mask_phone(t.phone, masked, sizeof masked);
    log_info("trace", "event=trace phone=%s", masked);

    int ret = -1;
    json_object *root = json_object_new_object();
    add_str(root, "phone", t.phone);
    add_str(root, "event_id", opts->event_id);
    add_str(root, "topic", cfg->topic);
    add_str(root, "dlq_topic", cfg->dlq_topic);
    add_str(root, "consumer_group", cfg->consumer_group);

    if (!(t.db = admin_pg_connect(cfg, "ticketd-trace", err, errlen))) goto out;
    if (!(t.rk = admin_kafka_reader(cfg, brokers, "ticketd-trace-reader", "ticketd-trace", err,
                                    errlen)))
        goto out;
    if (admin_group_offsets(cfg, brokers, "ticketd-trace", &t.nparts, &t.committed, err, errlen))
        goto out;

    int found = trace_collect(&t, root);
    if (found < 0) goto out;
    if (found == 0) t.need_scan = true;

    json_object *matches = json_object_new_array();
    json_object_object_add(root, "topic_matches", matches);
    json_object_object_add(root, "scanned", json_object_new_boolean(t.need_scan || opts->scan));
    if (t.need_scan || opts->scan) {
        if (scan_topic(&t, cfg->topic, false, matches)) goto out;
        if (scan_topic(&t, cfg->dlq_topic, true, matches)) goto out;
        if (annotate_matches(&t, matches)) goto out;
        found += (int)json_object_array_length(matches);
    }
    if (human_out) render_human(root, human_out);
    if (json_out) {
        *json_out = root;
        root = NULL;
    }
    ret = found;
out:
    json_object_put(root);
    free(t.committed);
    admin_kafka_destroy(t.rk);
    PQfinish(t.db);
    return ret;
}

/* ------------------------------------------------------------------ human output */

static const char *g(json_object *o, const char *k)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(o, k, &v) || !v) return NULL;
    return json_object_get_string(v);
}

static const char *or_dash(const char *s)
{
    return s ? s : "-";
}

static const char *or_empty(const char *s)
{
    return s ? s : "";
}

static void render_outbox(json_object *e, FILE *out)
{
    fprintf(out, "  outbox     event %s, created %s, ", or_dash(g(e, "event_id")),
            or_dash(g(e, "created_at")));
    if (g(e, "published_at"))
        fprintf(out, "published %s at partition %s offset %s\n", g(e, "published_at"),
                or_dash(g(e, "partition")), or_dash(g(e, "offset")));
    else
        fprintf(out, "NOT published (attempts %s%s%s)\n", or_dash(g(e, "attempts")),
                g(e, "last_error") ? ", last error: " : "", or_empty(g(e, "last_error")));
    json_object *rec = NULL;
    if (json_object_object_get_ex(e, "topic_record", &rec) && rec) {
        json_object *found = NULL;
        json_object_object_get_ex(rec, "found", &found);
        if (json_object_get_boolean(found))
            fprintf(out, "  topic      %s/%s@%s: timestamp %s, key %s, ce_id %s (this event)\n",
                    g(rec, "topic"), g(rec, "partition"), g(rec, "offset"),
                    or_dash(g(rec, "timestamp")), or_dash(g(rec, "key")), or_dash(g(rec, "ce_id")));
        else
            fprintf(out, "  topic      %s/%s@%s: %s\n", g(rec, "topic"), g(rec, "partition"),
                    g(rec, "offset"), or_dash(g(rec, "reason")));
    }
    json_object *p = NULL;
    if (json_object_object_get_ex(e, "processed", &p) && p)
        fprintf(out, "  consumer   processed at %s by group %s\n", or_dash(g(p, "processed_at")),
                or_dash(g(p, "consumer_group")));
    else
        fprintf(out, "  consumer   not processed (group committed offset: %s)\n",
                or_dash(g(e, "group_committed_offset")));
    json_object *effects = NULL;
    if (json_object_object_get_ex(e, "effects", &effects) && effects) {
        for (size_t i = 0; i < json_object_array_length(effects); i++) {
            json_object *f = json_object_array_get_idx(effects, i), *d = NULL;
            json_object_object_get_ex(f, "done", &d);
            fprintf(out, "  effect     %s: %s (attempts %s%s%s)\n", or_dash(g(f, "effect")),
                    json_object_get_boolean(d) ? "done" : "NOT done", or_dash(g(f, "attempts")),
                    g(f, "last_error") ? ", last error: " : "", or_empty(g(f, "last_error")));
        }
    }
    json_object *pts = NULL;
    if (json_object_object_get_ex(e, "points", &pts) && pts)
        fprintf(out, "  points     %s granted at %s\n", or_dash(g(pts, "points")),
                or_dash(g(pts, "granted_at")));
    json_object *dls = NULL;
    if (json_object_object_get_ex(e, "dead_letters", &dls) && dls) {
        for (size_t i = 0; i < json_object_array_length(dls); i++) {
            json_object *d = json_object_array_get_idx(dls, i);
            fprintf(out, "  DLQ        %s after %s attempts: %s: %s (DLQ %s@%s)%s%s\n",
                    or_dash(g(d, "dead_lettered_at")), or_dash(g(d, "attempts")),
                    or_dash(g(d, "error_class")), or_dash(g(d, "error_message")),
                    or_dash(g(d, "dlq_partition")), or_dash(g(d, "dlq_offset")),
                    g(d, "replayed_at") ? ", replayed " : "", g(d, "replayed_at") ? g(d, "replayed_at") : "");
        }
    }
    fprintf(out, "  => %s: %s\n", or_dash(g(e, "status")), or_dash(g(e, "story")));
}

static void render_human(json_object *root, FILE *out)
{
    fprintf(out, "trace of phone %s%s%s (topic %s, DLQ %s, group %s)\n", g(root, "phone"),
            g(root, "event_id") ? ", event " : "", g(root, "event_id") ? g(root, "event_id") : "",
            g(root, "topic"), g(root, "dlq_topic"), g(root, "consumer_group"));
    json_object *apps = NULL, *orphans = NULL, *matches = NULL, *scanned = NULL;
    json_object_object_get_ex(root, "applications", &apps);
    json_object_object_get_ex(root, "outbox_without_application", &orphans);
    json_object_object_get_ex(root, "topic_matches", &matches);
    json_object_object_get_ex(root, "scanned", &scanned);
    size_t napps = apps ? json_object_array_length(apps) : 0;
    if (napps == 0) fprintf(out, "\nno application row for this phone in the database\n");
    for (size_t i = 0; i < napps; i++) {
        json_object *a = json_object_array_get_idx(apps, i), *rows = NULL;
        fprintf(out, "\napplication %s: event %s, name %s, email %s, seats %s, created %s\n",
                g(a, "id"), or_dash(g(a, "event_id")), or_dash(g(a, "name")),
                or_dash(g(a, "email")), or_dash(g(a, "seats")), or_dash(g(a, "created_at")));
        json_object_object_get_ex(a, "outbox", &rows);
        for (size_t j = 0; rows && j < json_object_array_length(rows); j++)
            render_outbox(json_object_array_get_idx(rows, j), out);
        if (!rows || json_object_array_length(rows) == 0)
            fprintf(out, "  => %s: %s\n", or_dash(g(a, "status")), or_dash(g(a, "story")));
    }
    for (size_t j = 0; orphans && j < json_object_array_length(orphans); j++) {
        json_object *e = json_object_array_get_idx(orphans, j);
        fprintf(out, "\noutbox row without an application (application %s):\n",
                or_dash(g(e, "application_id")));
        render_outbox(e, out);
    }
    if (json_object_get_boolean(scanned)) {
        size_t n = matches ? json_object_array_length(matches) : 0;
        fprintf(out, "\nsearched %s and %s for this phone: %zu message(s)\n", g(root, "topic"),
                g(root, "dlq_topic"), n);
        for (size_t i = 0; i < n; i++) {
            json_object *m = json_object_array_get_idx(matches, i), *in = NULL;
            json_object_object_get_ex(m, "in_outbox", &in);
            fprintf(out, "  %s/%s@%s: timestamp %s, key %s, ce_id %s", g(m, "topic"),
                    g(m, "partition"), g(m, "offset"), or_dash(g(m, "timestamp")),
                    or_dash(g(m, "key")), or_dash(g(m, "ce_id")));
            if (g(m, DLQ_H_ERROR_CLASS))
                fprintf(out, ", dead-lettered: %s: %s", g(m, DLQ_H_ERROR_CLASS),
                        or_dash(g(m, DLQ_H_ERROR_MESSAGE)));
            if (json_object_get_boolean(in))
                fprintf(out, "; outbox row of application %s%s\n", or_dash(g(m, "application_id")),
                        g(m, "recorded_offset") ? "" : " (not marked published)");
            else
                fprintf(out, "; NO OUTBOX ROW in the database\n");
        }
    }
}

/* ------------------------------------------------------------------ CLI */

static void trace_usage(FILE *out)
{
    fprintf(out,
            "usage: ticketd trace --phone P [--event-id E] [--scan] [--json] [settings flags]\n"
            "  One customer's trail: application, outbox row, the topic record, consumer\n"
            "  status, effects, dead letters. Searches the topic and the DLQ by phone when the\n"
            "  DB has no row (or --scan). The output shows the phone asked for; logs mask it.\n"
            "  exit status: 0 found, 1 nothing found anywhere, 2 error\n");
}

static int trace_cli_run(const struct cfg *cfg, const void *opts, FILE *human_out,
                         json_object **json_out, char *err, size_t errlen)
{
    return trace_run(cfg, cfg->kafka_brokers, opts, human_out, json_out, err, errlen);
}

int trace_main(struct cfg *loaded, int argc, char **argv)
{
    (void)loaded; /* reloaded by admin_cli_main, with the settings flags that follow our own */
    struct trace_opts opts = {0};
    const struct admin_cli_flag flags[] = {
        {.name = "--phone", .value = &opts.phone, .required = true},
        {.name = "--event-id", .value = &opts.event_id},
        {.name = "--scan", .set = &opts.scan},
        {.name = NULL}};
    const struct admin_cli_cmd cmd = {"trace", trace_usage, flags,
                                      "'http://HOST:PORT/admin/trace?phone=...'", trace_cli_run,
                                      0, 1}; /* 1: nothing found anywhere */
    return admin_cli_main(&cmd, &opts, argc, argv);
}
