/* audit: reconciliation across applications, outbox, topic, consumer and DLQ (see audit.h).
 *
 * Shape of a run (all blocking; CLI or thread pool):
 *   committed offsets (group) -> BEGIN REPEATABLE READ -> stage 1 anti-joins -> unpublished
 *   rows -> watermarks -> merge join of the published rows (cursor ordered by partition,
 *   offset) with each partition read low..high -> lookups of unmatched messages by ce_id (a
 *   second, autocommit connection, so rows committed after the snapshot are seen) -> a scan
 *   of the DLQ topic for events below the committed offset that the DB does not account for.
 * Everything a run keeps grows with the number of problems, and that is capped. */
#include "audit.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin_cli.h"
#include "admin_common.h"
#include "admin_kafka.h"
#include "admin_pg.h"
#include "audit_ctx.h"
#include "effects.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"
#include "validate.h"

/* ------------------------------------------------------------------ small helpers */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool is_uuid(const char *s)
{
    return effects_is_uuid(s, strlen(s));
}

/* ------------------------------------------------------------------ PostgreSQL */

static int pg_cmd(PGconn *c, const char *sql, char *err, size_t errlen)
{
    PGresult *r = admin_pg_exec(c, sql, 0, NULL, err, errlen);
    if (!r) return -1;
    PQclear(r);
    return 0;
}

/* A server-side cursor read FETCH by FETCH: memory stays at one batch of rows. */
struct pgcur {
    PGconn *conn;
    const char *name;
    PGresult *res;
    int row, nrows;
    bool done;
};

static int cur_open(struct pgcur *k, PGconn *c, const char *name, const char *select, int n,
                    const char *const *params, char *err, size_t errlen)
{
    memset(k, 0, sizeof *k);
    k->conn = c;
    k->name = name;
    size_t len = strlen(select) + 64;
    char *sql = malloc(len);
    if (!sql) return -1;
    snprintf(sql, len, "DECLARE %s NO SCROLL CURSOR FOR %s", name, select);
    PGresult *r = admin_pg_exec(c, sql, n, params, err, errlen);
    free(sql);
    if (!r) return -1;
    PQclear(r);
    k->row = -1;
    return 0;
}

/* 1: k->row is the current row of k->res; 0: no more rows; -1: error. */
static int cur_next(struct pgcur *k, char *err, size_t errlen)
{
    if (k->done) return 0;
    if (k->res && k->row + 1 < k->nrows) {
        k->row++;
        return 1;
    }
    PQclear(k->res);
    k->res = NULL;
    char sql[96];
    snprintf(sql, sizeof sql, "FETCH %d FROM %s", AUDIT_FETCH_ROWS, k->name);
    k->res = admin_pg_exec(k->conn, sql, 0, NULL, err, errlen);
    if (!k->res) return -1;
    k->nrows = PQntuples(k->res);
    if (k->nrows == 0) {
        k->done = true;
        return 0;
    }
    k->row = 0;
    return 1;
}

static const char *cur_get(const struct pgcur *k, int col)
{
    return PQgetisnull(k->res, k->row, col) ? NULL : PQgetvalue(k->res, k->row, col);
}

static void cur_close(struct pgcur *k)
{
    PQclear(k->res);
    k->res = NULL;
    if (k->conn && k->name && PQtransactionStatus(k->conn) == PQTRANS_INTRANS) {
        char sql[96];
        snprintf(sql, sizeof sql, "CLOSE %s", k->name);
        PQclear(PQexec(k->conn, sql));
    }
}

/* ------------------------------------------------------------------ report */

static const struct cat cat_template[C_COUNT] = {
    [C_WITHOUT_OUTBOX] = {"without_outbox", "applications without an outbox row", true, 0, NULL},
    [C_OUTBOX_ORPHAN] = {"outbox_without_application", "outbox rows without an application",
                         true, 0, NULL},
    [C_PRUNED_UNACCOUNTED] = {"pruned_unaccounted",
                              "outbox row pruned, event neither processed nor dead-lettered",
                              true, 0, NULL},
    [C_UNPUBLISHED] = {"unpublished", "unpublished past the grace window", true, 0, NULL},
    [C_NOT_IN_TOPIC] = {"not_in_topic", "marked published, not in the topic", true, 0, NULL},
    [C_WRONG_OFFSET] = {"wrong_offset", "recorded offset holds another event", true, 0, NULL},
    [C_TOPIC_ORPHAN] = {"topic_without_row", "topic messages with no outbox row", true, 0, NULL},
    [C_RECORDED_ELSEWHERE] = {"recorded_elsewhere",
                              "topic messages whose row records another position (re-sends)",
                              false, 0, NULL},
    [C_EXPIRED] = {"expired", "expired from the topic (below the log start; the DB holds the ack)",
                   false, 0, NULL},
    [C_EXPIRED_UNCONSUMED] = {"expired_unconsumed",
                              "expired from the topic before it was consumed", true, 0, NULL},
    [C_UNHANDLED] = {"unhandled", "below the committed offset, neither processed nor dead-lettered",
                     true, 0, NULL},
    [C_NOT_CONSUMED] = {"not_consumed",
                        "published longer than the grace window ago, not consumed yet", true, 0,
                        NULL},
    [C_EFFECTS_OPEN] = {"effects_not_done",
                        "below the committed offset, processed but effects not done", true, 0,
                        NULL},
    [C_DEAD_LETTERED] = {"dead_lettered", "in the dead-letter queue, not replayed", true, 0, NULL},
};

/* true when id was not in the set (or the set is full and cannot tell). */
static bool idset_add(struct idset *s, int64_t id)
{
    if (s->full) return true;
    if (s->n * 2 >= s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1024;
        int64_t *slots = cap <= 2 * (size_t)AUDIT_DISTINCT_MAX ? calloc(cap, sizeof *slots) : NULL;
        if (!slots) {
            s->full = true;
            return true;
        }
        for (size_t i = 0; i < s->cap; i++) {
            if (!s->slots[i]) continue;
            size_t j = (size_t)((uint64_t)s->slots[i] * 0x9E3779B97F4A7C15ull) & (cap - 1);
            while (slots[j]) j = (j + 1) & (cap - 1);
            slots[j] = s->slots[i];
        }
        free(s->slots);
        s->slots = slots;
        s->cap = cap;
    }
    int64_t key = id + 1;
    size_t j = (size_t)((uint64_t)key * 0x9E3779B97F4A7C15ull) & (s->cap - 1);
    while (s->slots[j]) {
        if (s->slots[j] == key) return false;
        j = (j + 1) & (s->cap - 1);
    }
    s->slots[j] = key;
    s->n++;
    return true;
}

static void ctx_missing_id(struct audit_ctx *a, json_object *id)
{
    if (json_object_is_type(id, json_type_int) &&
        !idset_add(&a->distinct, json_object_get_int64(id))) {
        json_object_put(id);
        return;
    }
    a->missing++;
    if (json_object_array_length(a->missing_ids) < AUDIT_LIST_MAX)
        json_object_array_add(a->missing_ids, id);
    else
        json_object_put(id);
}

/* Records one finding; item (taken) should carry "application_id" when there is one and a
 * human "detail". For a missing category, id (taken, may be NULL) goes to the verdict. */
static void add(struct audit_ctx *a, int c, json_object *item, json_object *id)
{
    struct cat *k = &a->cats[c];
    k->count++;
    if (json_object_array_length(k->items) < AUDIT_LIST_MAX)
        json_object_array_add(k->items, item);
    else
        json_object_put(item);
    if (k->missing)
        ctx_missing_id(a, id ? id : json_object_new_string("?"));
    else if (id)
        json_object_put(id);
}

static json_object *item_new(int64_t app_id, const char *event_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static json_object *item_new(int64_t app_id, const char *event_id, const char *fmt, ...)
{
    json_object *o = json_object_new_object();
    if (app_id >= 0) json_object_object_add(o, "application_id", json_object_new_int64(app_id));
    if (event_id) json_object_object_add(o, "event_id", json_object_new_string(event_id));
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    json_object_object_add(o, "detail", json_object_new_string(detail));
    return o;
}

/* The filter shared by every query: $1 the show's event_id, $2 since. */
#define APP_FILTER "($1::text IS NULL OR a.event_id = $1) AND ($2::timestamptz IS NULL OR a.created_at >= $2)"
#define OUTBOX_FILTER                                                                          \
    "($1::text IS NULL OR o.payload->>'event_id' = $1) AND "                                   \
    "($2::timestamptz IS NULL OR o.created_at >= $2)"

/* ------------------------------------------------------------------ stage 1 */

/* An application whose outbox row was pruned: accounted for only by what the consumer
 * left. Columns 3..6 of the stage-1 cursor: points granted, effects open, open dead letter,
 * any dead letter. */
static void pruned_check(struct audit_ctx *a, int64_t id, const struct pgcur *k)
{
    const char *points = cur_get(k, 3), *open = cur_get(k, 4), *dlq = cur_get(k, 5);
    const char *any_dl = cur_get(k, 6);
    bool processed = points && points[0] == 't';
    if (dlq) {
        json_object *it = item_new(id, NULL, "application %" PRId64 " (outbox row pruned)"
                                   " is in the DLQ: %s", id, dlq);
        json_object_object_add(it, "error", json_object_new_string(dlq));
        add(a, C_DEAD_LETTERED, it, json_object_new_int64(id));
    } else if (processed && open) {
        json_object *it = item_new(id, NULL, "application %" PRId64 " (outbox row pruned)"
                                   " processed, effects not done: %s", id, open);
        json_object_object_add(it, "effects", json_object_new_string(open));
        add(a, C_EFFECTS_OPEN, it, json_object_new_int64(id));
    } else if (processed) {
        a->processed++;
    } else {
        add(a, C_PRUNED_UNACCOUNTED,
            item_new(id, NULL, "application %" PRId64 " (created %s): outbox row pruned, yet "
                     "no points, no dead letter%s", id, cur_get(k, 1),
                     any_dl && any_dl[0] == 't' ? " (a replayed one only)" : ""),
            json_object_new_int64(id));
    }
}

static int stage1(struct audit_ctx *a, const char *const *params)
{
    PGresult *r = admin_pg_exec(a->db, "SELECT count(*) FROM applications a WHERE " APP_FILTER,
                                2, params, a->err, a->errlen);
    if (!r) return -1;
    a->applications = admin_pg_i64(PQgetvalue(r, 0, 0), 0);
    PQclear(r);

    r = admin_pg_exec(a->db,
                      "SELECT count(*), count(*) FILTER (WHERE o.published_at IS NOT NULL) "
                      "FROM outbox_status o WHERE " OUTBOX_FILTER,
                      2, params, a->err, a->errlen);
    if (!r) return -1;
    a->outbox_rows = admin_pg_i64(PQgetvalue(r, 0, 0), 0);
    a->outbox_published = admin_pg_i64(PQgetvalue(r, 0, 1), 0);
    PQclear(r);

    /* The relay prunes published rows after OUTBOX_RETENTION (0 = never), and only once
     * their event was processed or dead-lettered: an application older than that without
     * its row is checked against what the consumer left (points_ledger and event_effects
     * carry the application id, as do dead_letters). */
    char retention[32];
    snprintf(retention, sizeof retention, "%" PRId64, a->cfg->outbox_retention_ms);
    const char *p3[3] = {params[0], params[1], retention};
    struct pgcur k;
    if (cur_open(&k, a->db, "audit_no_outbox",
                 "SELECT a.id, a.created_at,"
                 " $3::bigint > 0 AND a.created_at < now() - $3::bigint * interval '1 millisecond',"
                 " EXISTS (SELECT 1 FROM points_ledger pl WHERE pl.application_id = a.id),"
                 " (SELECT string_agg(e.effect, ', ' ORDER BY e.effect) FROM event_effects e"
                 "  WHERE e.application_id = a.id AND NOT e.done),"
                 " (SELECT d.error_class || ': ' || d.error_message FROM dead_letters d"
                 "  WHERE d.application_id = a.id AND d.replayed_at IS NULL ORDER BY d.id DESC"
                 "  LIMIT 1),"
                 " EXISTS (SELECT 1 FROM dead_letters d WHERE d.application_id = a.id)"
                 " FROM applications a WHERE " APP_FILTER
                 " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.aggregate_id = a.id)"
                 " ORDER BY a.id",
                 3, p3, a->err, a->errlen))
        return -1;
    int rc;
    while ((rc = cur_next(&k, a->err, a->errlen)) == 1) {
        const char *old = cur_get(&k, 2);
        int64_t id = admin_pg_i64(cur_get(&k, 0), -1);
        if (old && old[0] == 't') {
            a->pruned++;
            pruned_check(a, id, &k);
            continue;
        }
        add(a, C_WITHOUT_OUTBOX,
            item_new(id, NULL, "application %" PRId64 " (created %s) has no outbox row", id,
                     cur_get(&k, 1)),
            json_object_new_int64(id));
    }
    cur_close(&k);
    if (rc < 0) return -1;

    if (cur_open(&k, a->db, "audit_outbox_orphan",
                 "SELECT o.aggregate_id, o.event_id::text FROM outbox o WHERE " OUTBOX_FILTER
                 " AND NOT EXISTS (SELECT 1 FROM applications a WHERE a.id = o.aggregate_id)"
                 " ORDER BY o.id",
                 2, params, a->err, a->errlen))
        return -1;
    while ((rc = cur_next(&k, a->err, a->errlen)) == 1) {
        int64_t id = admin_pg_i64(cur_get(&k, 0), -1);
        const char *ev = cur_get(&k, 1);
        add(a, C_OUTBOX_ORPHAN,
            item_new(id, ev, "outbox row of event %s names application %" PRId64
                     ", which does not exist", ev, id),
            json_object_new_int64(id));
    }
    cur_close(&k);
    return rc < 0 ? -1 : 0;
}

/* ------------------------------------------------------------------ stage 2: unpublished */

static int stage2_unpublished(struct audit_ctx *a, const char *const *params)
{
    char grace[32];
    snprintf(grace, sizeof grace, "%" PRId64, a->cfg->audit_grace_ms);
    const char *p3[3] = {params[0], params[1], grace};
    struct pgcur k;
    if (cur_open(&k, a->db, "audit_unpublished",
                 "SELECT o.aggregate_id, o.event_id::text, o.created_at, o.attempts, o.last_error,"
                 " o.created_at < now() - $3::bigint * interval '1 millisecond'"
                 " FROM outbox_status o WHERE " OUTBOX_FILTER " AND o.published_at IS NULL ORDER BY o.id",
                 3, p3, a->err, a->errlen))
        return -1;
    int rc;
    while ((rc = cur_next(&k, a->err, a->errlen)) == 1) {
        const char *overdue = cur_get(&k, 5);
        if (!overdue || overdue[0] != 't') {
            a->in_grace++;
            continue;
        }
        int64_t id = admin_pg_i64(cur_get(&k, 0), -1);
        const char *ev = cur_get(&k, 1);
        const char *last_error = cur_get(&k, 4);
        json_object *it = item_new(id, ev, "application %" PRId64 ": event %s created %s, "
                                   "unpublished after %s attempts%s%s", id, ev, cur_get(&k, 2),
                                   cur_get(&k, 3), last_error ? ", last error: " : "",
                                   last_error ? last_error : "");
        json_object_object_add(it, "attempts",
                               json_object_new_int64(admin_pg_i64(cur_get(&k, 3), 0)));
        json_object_object_add(it, "last_error", admin_json_text(last_error));
        add(a, C_UNPUBLISHED, it, json_object_new_int64(id));
    }
    cur_close(&k);
    return rc < 0 ? -1 : 0;
}

/* ------------------------------------------------------------------ stage 2: lookups */

static json_object *key_id(const char *key)
{
    char *end;
    errno = 0;
    long long v = strtoll(key, &end, 10);
    if (*key && !*end && !errno) return json_object_new_int64(v);
    return json_object_new_string(*key ? key : "?");
}

static void orphan_or_retained(struct audit_ctx *a, const struct cand *c, const char *why)
{
    char ts[40];
    admin_format_ms(c->ts, ts, sizeof ts);
    /* Older than the outbox's own retention: the row was pruned on purpose. */
    if (c->ts >= 0 && a->cfg->outbox_retention_ms > 0 &&
        c->ts < now_ms() - a->cfg->outbox_retention_ms) {
        a->outside_scope++;
        return;
    }
    json_object *it = item_new(-1, c->ce_id[0] ? c->ce_id : NULL,
                               "message %s/%d@%" PRId64 " (key %s, ce_id %s, %s): %s",
                               a->cfg->topic, (int)c->partition, c->offset, c->key,
                               c->ce_id[0] ? c->ce_id : "-", ts, why);
    json_object_object_add(it, "partition", json_object_new_int(c->partition));
    json_object_object_add(it, "offset", json_object_new_int64(c->offset));
    json_object_object_add(it, "key", json_object_new_string(c->key));
    json_object_object_add(it, "timestamp", json_object_new_string(ts));
    add(a, C_TOPIC_ORPHAN, it, key_id(c->key));
}

/* Looks the pending unmatched messages up by ce_id on the autocommit connection. */
static int flush_cands(struct audit_ctx *a)
{
    if (a->ncands == 0) return 0;
    size_t cap = (size_t)a->ncands * (UUID_STR_LEN + 1) + 3;
    char *arr = malloc(cap);
    if (!arr) {
        admin_set_err(a->err, a->errlen, "out of memory");
        return -1;
    }
    size_t len = 0;
    arr[len++] = '{';
    for (int i = 0; i < a->ncands; i++) {
        if (!is_uuid(a->cands[i].ce_id)) continue;
        if (len > 1) arr[len++] = ',';
        memcpy(arr + len, a->cands[i].ce_id, UUID_STR_LEN);
        len += UUID_STR_LEN;
    }
    arr[len++] = '}';
    arr[len] = '\0';
    const char *params[1] = {arr};
    PGresult *r = admin_pg_exec(a->lookup,
                                "SELECT event_id::text, kafka_partition, kafka_offset FROM outbox_status"
                                " WHERE event_id = ANY($1::uuid[])",
                                1, params, a->err, a->errlen);
    free(arr);
    if (!r) return -1;
    int n = PQntuples(r);
    for (int i = 0; i < a->ncands; i++) {
        struct cand *c = &a->cands[i];
        if (!is_uuid(c->ce_id)) {
            orphan_or_retained(a, c, c->ce_id[0] ? "its ce_id is not an event id"
                                                 : "it has no ce_id header");
            continue;
        }
        int hit = -1;
        for (int j = 0; j < n; j++) {
            if (strcasecmp(PQgetvalue(r, j, 0), c->ce_id) == 0) {
                hit = j;
                break;
            }
        }
        if (hit < 0) {
            orphan_or_retained(a, c, "no outbox row has this event id");
            continue;
        }
        if (PQgetisnull(r, hit, 1) || PQgetisnull(r, hit, 2)) {
            a->outside_scope++; /* the relay is marking it right now */
            continue;
        }
        int32_t rp = (int32_t)admin_pg_i64(PQgetvalue(r, hit, 1), -1);
        int64_t ro = admin_pg_i64(PQgetvalue(r, hit, 2), -1);
        if (rp == c->partition && ro == c->offset) {
            a->outside_scope++; /* its row is outside the filter or newer than the snapshot */
            continue;
        }
        json_object *it = item_new(-1, c->ce_id,
                                   "message %s/%d@%" PRId64 " (key %s) repeats event %s, whose row "
                                   "records %d@%" PRId64,
                                   a->cfg->topic, (int)c->partition, c->offset, c->key, c->ce_id,
                                   (int)rp, ro);
        json_object_object_add(it, "partition", json_object_new_int(c->partition));
        json_object_object_add(it, "offset", json_object_new_int64(c->offset));
        json_object_object_add(it, "recorded_partition", json_object_new_int(rp));
        json_object_object_add(it, "recorded_offset", json_object_new_int64(ro));
        add(a, C_RECORDED_ELSEWHERE, it, NULL);
    }
    PQclear(r);
    a->ncands = 0;
    return 0;
}

/* A message at a position no row claimed (or claimed by a row with another ce_id). */
static int unmatched_message(struct audit_ctx *a, const rd_kafka_message_t *m)
{
    rd_kafka_timestamp_type_t tstype;
    int64_t ts = rd_kafka_message_timestamp(m, &tstype);
    if (a->since_ms >= 0 && ts >= 0 && ts < a->since_ms) return 0;
    if (a->opts->event_id) {
        /* Only messages of the audited show count; the value's event_id says which. */
        json_tokener *tok = json_tokener_new();
        json_object *v = tok ? json_tokener_parse_ex(tok, m->payload, (int)m->len) : NULL;
        json_object *e = NULL;
        bool same = v && json_object_object_get_ex(v, "event_id", &e) &&
                    json_object_is_type(e, json_type_string) &&
                    strcmp(json_object_get_string(e), a->opts->event_id) == 0;
        json_object_put(v);
        if (tok) json_tokener_free(tok);
        if (!same) return 0;
    }
    struct cand *c = &a->cands[a->ncands++];
    c->partition = m->partition;
    c->offset = m->offset;
    c->ts = ts;
    admin_key_text(m, c->key, sizeof c->key);
    admin_header(m, CE_ID, c->ce_id, sizeof c->ce_id);
    if (a->ncands == AUDIT_LOOKUP_BATCH) return flush_cands(a);
    return 0;
}

/* ------------------------------------------------------------------ stage 3 per row */

struct outrow {
    int32_t partition;   /* -1 when NULL */
    int64_t offset;      /* -1 when NULL */
    bool has_position;
    char ce_id[UUID_STR_LEN + 1];
    int64_t app_id;
    bool processed;
    const char *effects_open; /* NULL when every effect is done */
    const char *dlq_open;     /* NULL when not sitting in the DLQ */
    bool overdue;             /* created longer than AUDIT_GRACE ago */
    bool expired;             /* below the partition's log start */
};

static void consumer_check(struct audit_ctx *a, const struct outrow *r)
{
    int64_t committed = (r->partition >= 0 && r->partition < a->nparts)
                            ? a->parts[r->partition].committed
                            : -1;
    if (r->processed && !r->effects_open) {
        a->processed++;
        return;
    }
    if (r->dlq_open) {
        json_object *it = item_new(r->app_id, r->ce_id,
                                   "application %" PRId64 ": event %s (%d@%" PRId64
                                   ") is in the DLQ: %s",
                                   r->app_id, r->ce_id, (int)r->partition, r->offset, r->dlq_open);
        json_object_object_add(it, "error", json_object_new_string(r->dlq_open));
        add(a, C_DEAD_LETTERED, it, json_object_new_int64(r->app_id));
        return;
    }
    if (committed < 0 || r->offset >= committed) {
        /* Not consumed (yet): gone from the topic, it never will be; past the grace window
         * it is not accounted for. With no committed offset at all, nothing is. */
        const char *why = r->expired ? "expired from the topic before it was consumed"
                          : r->overdue ? "published, not consumed within AUDIT_GRACE"
                                       : NULL;
        if (!why) {
            a->pending++;
            return;
        }
        char committed_s[24] = "none";
        if (committed >= 0) snprintf(committed_s, sizeof committed_s, "%" PRId64, committed);
        json_object *it = item_new(r->app_id, r->ce_id,
                                   "application %" PRId64 ": event %s (%d@%" PRId64
                                   ", committed %s) %s%s%s",
                                   r->app_id, r->ce_id, (int)r->partition, r->offset, committed_s,
                                   why, r->processed ? "; processed, effects not done: " : "",
                                   r->processed && r->effects_open ? r->effects_open : "");
        add(a, r->expired ? C_EXPIRED_UNCONSUMED : r->processed ? C_EFFECTS_OPEN : C_NOT_CONSUMED,
            it, json_object_new_int64(r->app_id));
        return;
    }
    if (r->processed) {
        json_object *it = item_new(r->app_id, r->ce_id,
                                   "application %" PRId64 ": event %s (%d@%" PRId64
                                   ", committed %" PRId64 ") processed, effects not done: %s",
                                   r->app_id, r->ce_id, (int)r->partition, r->offset, committed,
                                   r->effects_open);
        json_object_object_add(it, "effects", json_object_new_string(r->effects_open));
        add(a, C_EFFECTS_OPEN, it, json_object_new_int64(r->app_id));
        return;
    }
    /* Maybe produced to the DLQ without its dead_letters row: settled after the DLQ scan. */
    if (a->nunh >= AUDIT_DLQ_CHECK_MAX) {
        a->unh_unchecked++;
        json_object *it = item_new(r->app_id, r->ce_id,
                                   "application %" PRId64 ": event %s (%d@%" PRId64
                                   ") is below the committed offset %" PRId64
                                   " but neither processed nor dead-lettered",
                                   r->app_id, r->ce_id, (int)r->partition, r->offset, committed);
        add(a, C_UNHANDLED, it, json_object_new_int64(r->app_id));
        return;
    }
    if (a->nunh == a->capunh) {
        size_t cap = a->capunh ? a->capunh * 2 : 256;
        struct unhandled *n = realloc(a->unh, cap * sizeof *n);
        if (!n) {
            a->unh_unchecked++;
            return;
        }
        a->unh = n;
        a->capunh = cap;
    }
    struct unhandled *u = &a->unh[a->nunh++];
    memcpy(u->ce_id, r->ce_id, sizeof u->ce_id);
    for (char *p = u->ce_id; *p; p++) *p = (char)tolower((unsigned char)*p);
    u->app_id = r->app_id;
    u->partition = r->partition;
    u->offset = r->offset;
    u->committed = committed;
    u->in_dlq_topic = false;
}

static void row_problem(struct audit_ctx *a, int c, const struct outrow *r, const char *why,
                        const char *found_ce_id)
{
    json_object *it = item_new(r->app_id, r->ce_id, "application %" PRId64 ": event %s at %d@%"
                               PRId64 ": %s", r->app_id, r->ce_id, (int)r->partition, r->offset,
                               why);
    if (r->has_position) {
        json_object_object_add(it, "partition", json_object_new_int(r->partition));
        json_object_object_add(it, "offset", json_object_new_int64(r->offset));
    }
    if (found_ce_id) json_object_object_add(it, "found_ce_id", json_object_new_string(found_ce_id));
    add(a, c, it, json_object_new_int64(r->app_id));
}

static void row_from_cursor(const struct pgcur *k, struct outrow *r)
{
    const char *p = cur_get(k, 0), *o = cur_get(k, 1);
    r->has_position = p && o;
    r->partition = (int32_t)admin_pg_i64(p, -1);
    r->offset = admin_pg_i64(o, -1);
    snprintf(r->ce_id, sizeof r->ce_id, "%s", cur_get(k, 2) ? cur_get(k, 2) : "");
    r->app_id = admin_pg_i64(cur_get(k, 3), -1);
    const char *pr = cur_get(k, 4);
    r->processed = pr && pr[0] == 't';
    r->effects_open = cur_get(k, 5);
    r->dlq_open = cur_get(k, 6);
    const char *od = cur_get(k, 7);
    r->overdue = od && od[0] == 't';
    r->expired = false;
}

/* ------------------------------------------------------------------ stage 2: merge join */

static const char *const published_sql =
    "SELECT o.kafka_partition, o.kafka_offset, o.event_id::text, o.aggregate_id,"
    " pe.event_id IS NOT NULL,"
    " CASE WHEN o.event_id IN (SELECT e.event_id FROM event_effects e WHERE NOT e.done) THEN"
    "  (SELECT string_agg(e.effect || ' (attempts ' || e.attempts || coalesce(', ' || e.last_error, '')"
    "   || ')', '; ' ORDER BY e.effect) FROM event_effects e WHERE e.event_id = o.event_id AND NOT e.done)"
    " END,"
    " CASE WHEN o.event_id IN (SELECT d.event_id FROM dead_letters d WHERE d.replayed_at IS NULL) THEN"
    "  (SELECT d.error_class || ': ' || d.error_message FROM dead_letters d"
    "   WHERE d.event_id = o.event_id AND d.replayed_at IS NULL ORDER BY d.id DESC LIMIT 1)"
    " END,"
    " o.created_at < now() - $3::bigint * interval '1 millisecond'"
    " FROM outbox_status o LEFT JOIN processed_events pe ON pe.event_id = o.event_id"
    " WHERE o.published_at IS NOT NULL AND " OUTBOX_FILTER
    " ORDER BY o.kafka_partition, o.kafka_offset";

/* Leaves *m (a topic orphan unless a row matched it) for the next message of rd, or NULL at
 * the end of the partition. 0 or -1. */
static int next_message(struct audit_ctx *a, struct admin_reader *rd, struct part_stat *ps,
                        rd_kafka_message_t **m, bool *matched)
{
    if (!*matched && unmatched_message(a, *m)) return -1;
    rd_kafka_message_destroy(*m);
    *m = NULL;
    *matched = false;
    int mr = admin_reader_next(rd, m, a->err, a->errlen);
    if (mr == 1) ps->messages++;
    return mr < 0 ? -1 : 0;
}

static int stage2_merge(struct audit_ctx *a, const char *const *params)
{
    struct pgcur k;
    char grace[32];
    snprintf(grace, sizeof grace, "%" PRId64, a->cfg->audit_grace_ms);
    const char *p3[3] = {params[0], params[1], grace};
    if (cur_open(&k, a->db, "audit_published", published_sql, 3, p3, a->err, a->errlen))
        return -1;
    int ret = -1;
    struct outrow row;
    int rc = cur_next(&k, a->err, a->errlen);
    if (rc < 0) goto out;
    if (rc == 1) row_from_cursor(&k, &row);

    /* Rows with a negative partition sort first. */
    while (rc == 1 && row.has_position && row.partition < 0) {
        row_problem(a, C_NOT_IN_TOPIC, &row, "no such partition", NULL);
        if ((rc = cur_next(&k, a->err, a->errlen)) < 0) goto out;
        if (rc == 1) row_from_cursor(&k, &row);
    }

    for (int p = 0; p < a->nparts; p++) {
        struct part_stat *ps = &a->parts[p];
        struct admin_reader rd;
        if (admin_reader_open(&rd, a->rk, a->cfg->topic, p, ps->low, ps->low, ps->high, a->err,
                              a->errlen)) {
            admin_reader_close(&rd);
            goto out;
        }
        rd_kafka_message_t *m = NULL;
        bool matched = false;
        int mr = admin_reader_next(&rd, &m, a->err, a->errlen);
        if (mr < 0) goto part_fail;
        if (mr == 1) ps->messages++;

        while (rc == 1 && row.has_position && row.partition == p) {
            ps->rows++;
            if (row.offset < rd.low) {
                ps->expired++;
                json_object *it = item_new(row.app_id, row.ce_id,
                                           "application %" PRId64 ": event %s at %d@%" PRId64
                                           " below the log start %" PRId64,
                                           row.app_id, row.ce_id, p, row.offset, rd.low);
                add(a, C_EXPIRED, it, NULL);
                row.expired = true;
                consumer_check(a, &row);
            } else if (row.offset >= ps->high) {
                char why[96];
                snprintf(why, sizeof why, "beyond the high watermark %" PRId64, ps->high);
                row_problem(a, C_NOT_IN_TOPIC, &row, why, NULL);
            } else {
                while (m && m->offset < row.offset)
                    if (next_message(a, &rd, ps, &m, &matched)) goto part_fail;
                if (row.offset < rd.low) { /* retention moved the log start while reading */
                    ps->expired++;
                    add(a, C_EXPIRED,
                        item_new(row.app_id, row.ce_id, "event %s at %d@%" PRId64
                                 " below the log start %" PRId64, row.ce_id, p, row.offset,
                                 rd.low),
                        NULL);
                    row.expired = true;
                    consumer_check(a, &row);
                } else if (m && m->offset == row.offset) {
                    char ce[64];
                    admin_header(m, CE_ID, ce, sizeof ce);
                    if (strcasecmp(ce, row.ce_id) == 0) {
                        matched = true;
                        ps->verified++;
                        consumer_check(a, &row);
                    } else {
                        char why[160];
                        snprintf(why, sizeof why, "the message there carries ce_id %s",
                                 ce[0] ? ce : "(none)");
                        row_problem(a, C_WRONG_OFFSET, &row, why, ce);
                    }
                } else {
                    row_problem(a, C_NOT_IN_TOPIC, &row, "no message at that offset", NULL);
                }
            }
            if ((rc = cur_next(&k, a->err, a->errlen)) < 0) goto part_fail;
            if (rc == 1) row_from_cursor(&k, &row);
        }
        /* The rest of the partition: messages no row claims. */
        while (m)
            if (next_message(a, &rd, ps, &m, &matched)) goto part_fail;
        admin_reader_close(&rd);
        if (flush_cands(a)) goto out;
        log_debug("audit", "event=partition_done partition=%d rows=%" PRId64 " messages=%" PRId64
                  " at_ms=%" PRId64, p, ps->rows, ps->messages, now_ms());
        continue;
    part_fail:
        if (m) rd_kafka_message_destroy(m);
        admin_reader_close(&rd);
        goto out;
    }
    /* Rows at partitions the topic does not have, or with no position at all. */
    while (rc == 1) {
        row_problem(a, C_NOT_IN_TOPIC, &row,
                    row.has_position ? "no such partition" : "published without a position",
                    NULL);
        if ((rc = cur_next(&k, a->err, a->errlen)) < 0) goto out;
        if (rc == 1) row_from_cursor(&k, &row);
    }
    ret = flush_cands(a);
out:
    cur_close(&k);
    return ret;
}

/* ------------------------------------------------------------------ stage 3: DLQ topic */

static int cmp_unhandled(const void *x, const void *y)
{
    return strcmp(((const struct unhandled *)x)->ce_id, ((const struct unhandled *)y)->ce_id);
}

/* A message of the DLQ topic: marks the unhandled event it carries, if any. */
static void dlq_message(void *ud, const rd_kafka_message_t *m)
{
    struct audit_ctx *a = ud;
    struct unhandled key;
    admin_header(m, CE_ID, key.ce_id, sizeof key.ce_id);
    for (char *c = key.ce_id; *c; c++) *c = (char)tolower((unsigned char)*c);
    struct unhandled *u = bsearch(&key, a->unh, a->nunh, sizeof *a->unh, cmp_unhandled);
    if (u) u->in_dlq_topic = true;
}

static int stage3_dlq_topic(struct audit_ctx *a)
{
    if (a->nunh == 0) return 0;
    qsort(a->unh, a->nunh, sizeof *a->unh, cmp_unhandled);
    return admin_scan_topic(a->rk, a->cfg->dlq_topic, 0, dlq_message, a, a->err, a->errlen);
}

static void stage3_settle(struct audit_ctx *a)
{
    for (size_t i = 0; i < a->nunh; i++) {
        const struct unhandled *u = &a->unh[i];
        if (u->in_dlq_topic) {
            json_object *it = item_new(u->app_id, u->ce_id,
                                       "application %" PRId64 ": event %s (%d@%" PRId64
                                       ") is in the DLQ topic (no dead_letters row)",
                                       u->app_id, u->ce_id, (int)u->partition, u->offset);
            add(a, C_DEAD_LETTERED, it, json_object_new_int64(u->app_id));
        } else {
            json_object *it = item_new(u->app_id, u->ce_id,
                                       "application %" PRId64 ": event %s (%d@%" PRId64
                                       ") is below the committed offset %" PRId64
                                       " but neither processed nor dead-lettered",
                                       u->app_id, u->ce_id, (int)u->partition, u->offset,
                                       u->committed);
            json_object_object_add(it, "partition", json_object_new_int(u->partition));
            json_object_object_add(it, "offset", json_object_new_int64(u->offset));
            json_object_object_add(it, "committed", json_object_new_int64(u->committed));
            add(a, C_UNHANDLED, it, json_object_new_int64(u->app_id));
        }
    }
}

/* ------------------------------------------------------------------ the run */

int audit_run(const struct cfg *cfg, const char *brokers, const struct audit_opts *opts,
              FILE *human_out, json_object **json_out, char *err, size_t errlen)
{
    struct audit_ctx a = {.cfg = cfg, .opts = opts, .err = err, .errlen = errlen, .since_ms = -1};
    for (int c = 0; c < C_COUNT; c++) {
        a.cats[c] = cat_template[c];
        a.cats[c].items = json_object_new_array();
    }
    a.missing_ids = json_object_new_array();
    const char *params[2] = {opts->event_id, opts->since};
    int ret = -1;
    int64_t *committed = NULL;
    uint64_t started = (uint64_t)now_ms();

    if (opts->event_id && !validate_event_id(opts->event_id, strlen(opts->event_id))) {
        admin_set_err(err, errlen, "bad event id (1-64 characters of [A-Za-z0-9._-])");
        ret = -2;
        goto out;
    }
    if (!brokers || !*brokers) {
        admin_set_err(err, errlen, "no Kafka brokers to read the topic from");
        goto out;
    }
    if (!(a.db = admin_pg_connect(cfg, "ticketd-audit", err, errlen))) goto out;
    if (opts->since) {
        const char *p1[1] = {opts->since};
        PGresult *r = PQexecParams(a.db, "SELECT (extract(epoch FROM $1::timestamptz) * 1000)::bigint",
                                   1, NULL, p1, NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            char msg[200];
            admin_pg_first_line(PQresultErrorMessage(r), msg, sizeof msg);
            admin_set_err(err, errlen,
                          "bad --since (a timestamp, e.g. 2026-11-26T19:00:00+09:00): %s", msg);
            PQclear(r);
            ret = -2;
            goto out;
        }
        a.since_ms = admin_pg_i64(PQgetvalue(r, 0, 0), -1);
        PQclear(r);
    }
    if (!(a.lookup = admin_pg_connect(cfg, "ticketd-audit-lookup", err, errlen))) goto out;
    if (!(a.rk = admin_kafka_reader(cfg, brokers, "ticketd-audit-reader", "ticketd-audit", err,
                                    errlen)))
        goto out;

    /* Order matters (audit.h): committed offsets, then the snapshot, then the watermarks. */
    if (admin_group_offsets(cfg, brokers, "ticketd-audit", &a.nparts, &committed, err, errlen))
        goto out;
    a.parts = calloc((size_t)a.nparts + 1, sizeof *a.parts);
    if (!a.parts) {
        admin_set_err(err, errlen, "out of memory");
        goto out;
    }
    log_debug("audit", "event=committed_read elapsed_ms=%" PRIu64, (uint64_t)now_ms() - started);
    for (int p = 0; p < a.nparts; p++) a.parts[p].committed = committed[p];

    if (pg_cmd(a.db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", err, errlen)) goto out;
    if (pg_cmd(a.db, "SET LOCAL work_mem = '64MB'", err, errlen)) goto out;
    if (stage1(&a, params)) goto out;
    log_debug("audit", "event=stage_done stage=1 elapsed_ms=%" PRIu64, (uint64_t)now_ms() - started);
    if (stage2_unpublished(&a, params)) goto out;
    log_debug("audit", "event=stage_done stage=2_unpublished elapsed_ms=%" PRIu64, (uint64_t)now_ms() - started);
    for (int p = 0; p < a.nparts; p++)
        if (admin_watermarks(a.rk, cfg->topic, p, &a.parts[p].low, &a.parts[p].high, err, errlen))
            goto out;
    if (stage2_merge(&a, params)) goto out;
    log_debug("audit", "event=stage_done stage=2_merge elapsed_ms=%" PRIu64, (uint64_t)now_ms() - started);
    if (pg_cmd(a.db, "COMMIT", err, errlen)) goto out;
    if (stage3_dlq_topic(&a)) goto out;
    stage3_settle(&a);

    log_info("audit", "event=audit_done applications=%" PRId64 " missing=%" PRId64
             " elapsed_ms=%" PRIu64, a.applications, a.missing, (uint64_t)now_ms() - started);
    if (human_out) audit_report_human(&a, human_out);
    if (json_out) *json_out = audit_report_json(&a);
    ret = a.missing > INT32_MAX ? INT32_MAX : (int)a.missing;
    if (opts->in_flight) *opts->in_flight = audit_in_flight(&a);
out:
    free(committed);
    free(a.parts);
    free(a.unh);
    free(a.distinct.slots);
    for (int c = 0; c < C_COUNT; c++) json_object_put(a.cats[c].items);
    json_object_put(a.missing_ids);
    admin_kafka_destroy(a.rk);
    PQfinish(a.lookup);
    PQfinish(a.db);
    return ret;
}

/* ------------------------------------------------------------------ CLI */

static void audit_usage(FILE *out)
{
    fprintf(out,
            "usage: ticketd audit [--event-id E] [--since T] [--json] [settings flags]\n"
            "  Reconciles applications, outbox rows, the topic (KAFKA_BROKERS), the consumer\n"
            "  group's committed offsets, processed events, effects and the DLQ.\n"
            "  --event-id E  only the applications of show E\n"
            "  --since T     only applications created at or after T (a timestamp)\n"
            "  --json        the report as JSON (the same as GET /admin/audit)\n"
            "  exit status: 0 complete (every application accounted for end to end),\n"
            "  1 something missing or still in progress (within AUDIT_GRACE), 2 error\n");
}

static int audit_cli_run(const struct cfg *cfg, const void *opts, FILE *human_out,
                         json_object **json_out, char *err, size_t errlen)
{
    int64_t flying = 0;
    struct audit_opts o = *(const struct audit_opts *)opts;
    o.in_flight = &flying;
    int r = audit_run(cfg, cfg->kafka_brokers, &o, human_out, json_out, err, errlen);
    return r == 0 && flying > 0 ? 1 : r; /* not complete yet: not a 0 exit */
}

int audit_main(struct cfg *loaded, int argc, char **argv)
{
    (void)loaded; /* reloaded by admin_cli_main, with the settings flags that follow our own */
    struct audit_opts opts = {0};
    const struct admin_cli_flag flags[] = {{.name = "--event-id", .value = &opts.event_id},
                                           {.name = "--since", .value = &opts.since},
                                           {.name = NULL}};
    const struct admin_cli_cmd cmd = {"audit", audit_usage, flags, "http://HOST:PORT/admin/audit",
                                      audit_cli_run, 1, 0}; /* 1: something is missing */
    return admin_cli_main(&cmd, &opts, argc, argv);
}
