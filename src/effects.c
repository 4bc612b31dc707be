/* effects: points (PostgreSQL), data platform (HTTP), e-mail (SMTP) per event. The order
 * and why a crash anywhere is safe are in effects.h. */
#include "effects.h"

#include <errno.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "db_pool.h"
#include "http_client.h"
#include "kafka_common.h"
#include "log.h"
#include "metrics.h"
#include "pg_array.h"
#include "strbuf.h"

#define POINTS_BATCH_MAX 4096   /* events per points statement (the consumer cuts smaller) */

struct effects {
    uv_loop_t *loop;
    const struct cfg *cfg;
    char *group;
    struct dbp *db;
    struct hc *hc;
    int points_stmt, marks_stmt, claim_stmt; /* prepared statements, or -1 */
    unsigned inflight;
    bool stopped;
};

/* Step 1 for a batch. $1..$7 are arrays with one element per event (duplicate ids allowed:
 * the first of each id, by position, writes). Rows back: kind 'g' + event id for each
 * points_ledger row inserted now; kind 'd' + event id + effect for each external effect
 * that was done before this statement. Data-modifying CTEs run to completion even though
 * the outer SELECT does not read all of them; the outer SELECT sees the tables as they were
 * before the statement. Inserts go in event-id order so that concurrent batches with
 * overlapping ids cannot deadlock. The grants and done flags are matched back in C, so no
 * CTE is joined with the input (generic plans can make such joins nested loops). */
static const char points_sql[] =
    "WITH input AS ("
    " SELECT DISTINCT ON (event_id) * FROM unnest($1::uuid[], $2::int[], $3::bigint[],"
    "  $4::bigint[], $5::text[], $6::bool[], $7::bool[])"
    "  WITH ORDINALITY AS t(event_id, partition, off, application_id, phone, want_dp,"
    "  want_email, ord) ORDER BY event_id, ord"
    "), pe AS ("
    " INSERT INTO processed_events (event_id, consumer_group, topic, partition, \"offset\")"
    " SELECT event_id, $8, $9, partition, off FROM input ORDER BY event_id"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    "), pl AS ("
    " INSERT INTO points_ledger (event_id, application_id, phone, points)"
    " SELECT i.event_id, i.application_id, i.phone, $10::int FROM input i"
    " WHERE i.event_id = ANY (ARRAY(SELECT event_id FROM pe)) ORDER BY i.event_id"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    "), ef AS ("
    " INSERT INTO event_effects AS e (event_id, effect, application_id, done, attempts)"
    " SELECT i.event_id, w.effect, i.application_id, w.effect = 'points',"
    "  (w.effect = 'points')::int"
    " FROM input i CROSS JOIN LATERAL (VALUES ('points', true), ('data_platform', i.want_dp),"
    "  ('email', i.want_email)) AS w(effect, wanted)"
    " WHERE w.wanted ORDER BY i.event_id, w.effect"
    " ON CONFLICT (event_id, effect) DO UPDATE"
    " SET done = true, attempts = e.attempts + 1, last_error = NULL, updated_at = now()"
    " WHERE e.effect = 'points' AND NOT e.done RETURNING 1"
    ")"
    " SELECT 'g' AS kind, event_id::text, NULL::text AS effect FROM pl"
    " UNION ALL"
    " SELECT 'd', x.event_id::text, x.effect FROM event_effects x"
    " WHERE x.event_id = ANY ($1::uuid[]) AND x.effect <> 'points' AND x.done";

/* Marks: $1 event id[], $2 effect[], $3 done[], $4 tries[], $5 error[]. Folded per
 * (event, effect) first, so a row is updated once; done never goes back to false (a late
 * failure mark cannot undo a success). */
static const char marks_sql[] =
    "UPDATE event_effects AS e SET attempts = e.attempts + u.tries, done = e.done OR u.done,"
    " last_error = CASE WHEN e.done OR u.done THEN NULL ELSE u.err END, updated_at = now()"
    " FROM (SELECT event_id, effect, bool_or(done) AS done, sum(tries)::int AS tries,"
    "  max(err) AS err FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::int[], $5::text[])"
    "  AS t(event_id, effect, done, tries, err) GROUP BY event_id, effect) AS u"
    " WHERE e.event_id = u.event_id AND e.effect = u.effect";

/* $1 event id, $2 token, $3 ttl in ms. The outer SELECT reads the row as it was before the
 * UPDATE: claimed = 1 -> ours; else done -> nothing to send; else held by another token. */
static const char claim_sql[] =
    "WITH c AS (UPDATE event_effects SET claim_token = $2::uuid,"
    " claimed_until = now() + $3::bigint * interval '1 millisecond', updated_at = now()"
    " WHERE event_id = $1::uuid AND effect = 'email' AND NOT done"
    " AND (claim_token IS NULL OR claim_token = $2::uuid OR claimed_until < now())"
    " RETURNING 1)"
    " SELECT (SELECT count(*) FROM c)::int, e.done FROM event_effects e"
    " WHERE e.event_id = $1::uuid AND e.effect = 'email'";

/* ---- parsing ---- */

bool effects_is_uuid(const char *s, size_t len)
{
    if (!s || len != UUID_STR_LEN) return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-') return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return false;
        }
    }
    return true;
}

static bool has_control(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return true;
    return false;
}

static int copy_string(json_object *obj, const char *key, bool required, char *out,
                       size_t outlen, char *err, size_t errlen)
{
    json_object *v;
    out[0] = '\0';
    if (!json_object_object_get_ex(obj, key, &v) || v == NULL) {
        if (!required) return 0;
        snprintf(err, errlen, "value.%s is missing", key);
        return -1;
    }
    if (!json_object_is_type(v, json_type_string)) {
        snprintf(err, errlen, "value.%s is not a string", key);
        return -1;
    }
    const char *s = json_object_get_string(v);
    size_t len = (size_t)json_object_get_string_len(v);
    if (len >= outlen || has_control(s, len) || memchr(s, '\0', len)) {
        snprintf(err, errlen, "value.%s is too long or holds control characters", key);
        return -1;
    }
    memcpy(out, s, len);
    out[len] = '\0';
    return 0;
}

int effects_parse(const char *ce_id, size_t ce_id_len, const char *ce_time, size_t ce_time_len,
                  const char *value, size_t value_len, struct effects_event *out, char *err,
                  size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!ce_id) {
        snprintf(err, errlen, "missing %s header", CE_ID);
        return -1;
    }
    if (!effects_is_uuid(ce_id, ce_id_len)) {
        snprintf(err, errlen, "%s header is not a UUID", CE_ID);
        return -1;
    }
    memcpy(out->event_id, ce_id, ce_id_len);
    out->event_id[ce_id_len] = '\0';
    if (ce_time && ce_time_len < sizeof out->ce_time && !has_control(ce_time, ce_time_len)) {
        memcpy(out->ce_time, ce_time, ce_time_len);
        out->ce_time[ce_time_len] = '\0';
    }
    if (!value || value_len == 0) {
        snprintf(err, errlen, "empty value");
        return -1;
    }
    if (value_len > INT32_MAX) {
        snprintf(err, errlen, "value too large");
        return -1;
    }

    int rc = -1;
    struct json_tokener *tok = json_tokener_new();
    if (!tok) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    json_object *obj = json_tokener_parse_ex(tok, value, (int)value_len);
    size_t end = obj ? json_tokener_get_parse_end(tok) : 0;
    while (end < value_len && (value[end] == ' ' || value[end] == '\t' || value[end] == '\r' ||
                               value[end] == '\n'))
        end++;
    if (!obj || end != value_len) {
        snprintf(err, errlen, "value is not JSON");
        goto out;
    }
    if (!json_object_is_type(obj, json_type_object)) {
        snprintf(err, errlen, "value is not a JSON object");
        goto out;
    }
    json_object *v;
    if (!json_object_object_get_ex(obj, "id", &v) || !json_object_is_type(v, json_type_int) ||
        json_object_get_int64(v) <= 0) {
        snprintf(err, errlen, "value.id is not a positive integer");
        goto out;
    }
    out->application_id = json_object_get_int64(v);
    if (copy_string(obj, "event_id", true, out->ticket_event, sizeof out->ticket_event, err,
                    errlen) != 0)
        goto out;
    if (copy_string(obj, "phone", true, out->phone, sizeof out->phone, err, errlen) != 0)
        goto out;
    for (const char *p = out->phone; *p; p++) {
        if (*p < '0' || *p > '9') {
            snprintf(err, errlen, "value.phone is not digits");
            goto out;
        }
    }
    if (!out->phone[0]) {
        snprintf(err, errlen, "value.phone is empty");
        goto out;
    }
    if (copy_string(obj, "email", false, out->email, sizeof out->email, err, errlen) != 0)
        goto out;
    if (out->email[0] && (!strchr(out->email, '@') || strpbrk(out->email, " <>"))) {
        snprintf(err, errlen, "value.email is not an address");
        goto out;
    }
    out->value = value;
    out->value_len = value_len;
    rc = 0;
out:
    if (obj) json_object_put(obj);
    json_tokener_free(tok);
    return rc;
}

/* ---- array literals ---- */

/* The parameters of a batch statement: one PostgreSQL array literal per column. */
#define BATCH_COLUMNS_MAX 7

static void columns_free(struct strbuf *cols, int n)
{
    for (int i = 0; i < n; i++) strbuf_free(&cols[i]);
}

/* 0, or -1 when a column could not be built (out of memory). */
static int columns_ok(struct strbuf *cols, int n)
{
    for (int i = 0; i < n; i++)
        if (cols[i].failed) return -1;
    return 0;
}

/* ---- statements ---- */

int effects_create(struct effects **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *consumer_group, struct dbp *db, struct hc *hc)
{
    struct effects *fx = calloc(1, sizeof *fx);
    if (!fx) return -ENOMEM;
    fx->group = strdup(consumer_group);
    if (!fx->group) {
        free(fx);
        return -ENOMEM;
    }
    fx->loop = loop;
    fx->cfg = cfg;
    fx->db = db;
    fx->hc = hc;
    fx->points_stmt = dbp_prepare(db, points_sql);
    fx->marks_stmt = dbp_prepare(db, marks_sql);
    if (fx->points_stmt < 0) fx->points_stmt = -1; /* falls back to unprepared statements */
    if (fx->marks_stmt < 0) fx->marks_stmt = -1;
    fx->claim_stmt = dbp_prepare(db, claim_sql);
    if (fx->claim_stmt < 0) fx->claim_stmt = -1;
    metrics_describe("ticketd_sink_failures_total", "counter",
                     "failed follow-up effect attempts, by effect");
    metrics_describe("ticketd_points_granted_total", "counter",
                     "points_ledger rows inserted (exactly one per event)");
    metrics_describe("ticketd_consumer_points_batch_size", "histogram",
                     "events per points statement (group commit of the consumer)");
    metrics_describe("ticketd_consumer_marks_batch_size", "histogram",
                     "done marks per statement");
    *out = fx;
    return 0;
}

void effects_stop(struct effects *fx)
{
    fx->stopped = true;
}

unsigned effects_inflight(const struct effects *fx)
{
    return fx->inflight;
}

void effects_free(struct effects *fx)
{
    if (!fx) return;
    free(fx->group);
    free(fx);
}

bool effects_wants_data_platform(const struct effects *fx)
{
    return fx->cfg->data_platform_url && fx->cfg->data_platform_url[0];
}

bool effects_wants_email(const struct effects *fx, const struct effects_event *ev)
{
    return ev->email[0] && fx->cfg->smtp_url && fx->cfg->smtp_url[0];
}

static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};

static int query(struct effects *fx, int stmt, const char *sql, int nparams,
                 const char *const *params, dbp_result_fn cb, void *ud)
{
    return stmt >= 0 ? dbp_query_prepared(fx->db, stmt, nparams, params, cb, ud)
                     : dbp_query(fx->db, sql, nparams, params, cb, ud);
}

/* Keeps printable ASCII only: error texts quote remote replies, and PostgreSQL text (and a
 * Kafka header read by humans) must not carry invalid UTF-8 or control bytes. */
static void ascii_only(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) *s = '?';
}

/* libpq's error text, one line, printable. */
static void db_error(char *out, size_t n, const char *prefix, const PGresult *res,
                     const char *error)
{
    snprintf(out, n, "%s%s", prefix,
             error ? error : res ? PQresultErrorMessage(res) : "no result");
    size_t len = strlen(out);
    while (len && (out[len - 1] == '\n' || out[len - 1] == ' ')) out[--len] = '\0';
    ascii_only(out);
}

struct points_batch {
    struct effects *fx;
    size_t n;
    effects_points_fn cb;
    void *ud;
    char (*ids)[UUID_STR_LEN + 1];  /* lower-case event ids, by position */
    struct effects_points_result *res;
};

/* FNV-1a of an event id: the open-addressing table that matches result rows back to the
 * batch positions. */
static unsigned id_hash(const char *id)
{
    unsigned h = 2166136261u;
    for (; *id; id++) h = (h ^ (unsigned char)*id) * 16777619u;
    return h;
}

static void on_points(void *ud, const PGresult *res, const char *error)
{
    char msg[600], qb[700];
    struct points_batch *b = ud;
    struct effects *fx = b->fx;
    fx->inflight--;

    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        db_error(msg, sizeof msg, "points: ", res, error);
        metrics_counter_add("ticketd_sink_failures_total", "effect=\"points\"", (double)b->n);
        bool ours = dbp_error_is_ours(res); /* then the consumer logs the outage once */
        log_at(ours ? LOG_DEBUG : LOG_WARN, "effects",
               "event=effect_failed effect=points events=%zu class=db err=%s", b->n,
               log_quoted(msg, qb, sizeof qb));
        b->cb(b->ud, NULL, msg, ours);
        goto out;
    }
    /* position lists per id: head[slot] -> first position, next[pos] -> the following one */
    size_t cap = 16;
    while (cap < b->n * 2) cap *= 2;
    long *table = malloc(cap * sizeof *table);
    long *next = malloc(b->n * sizeof *next);
    if (!table || !next) {
        free(table);
        free(next);
        b->cb(b->ud, NULL, "points: out of memory", true);
        goto out;
    }
    for (size_t i = 0; i < cap; i++) table[i] = -1;
    for (size_t i = b->n; i-- > 0;) {
        size_t h = id_hash(b->ids[i]) & (cap - 1);
        while (table[h] >= 0 && strcmp(b->ids[table[h]], b->ids[i]) != 0) h = (h + 1) & (cap - 1);
        next[i] = table[h]; /* the same id seen at a later position, or -1 */
        table[h] = (long)i;
    }
    int rows = PQntuples(res);
    size_t granted = 0;
    for (int r = 0; r < rows; r++) {
        const char *kind = PQgetvalue(res, r, 0), *id = PQgetvalue(res, r, 1);
        size_t h = id_hash(id) & (cap - 1);
        while (table[h] >= 0 && strcmp(b->ids[table[h]], id) != 0) h = (h + 1) & (cap - 1);
        if (table[h] < 0) continue; /* not ours (cannot happen) */
        if (kind[0] == 'g') {
            b->res[table[h]].points_granted = true; /* the first position only */
            granted++;
            continue;
        }
        bool dp = strcmp(PQgetvalue(res, r, 2), "data_platform") == 0;
        for (long i = table[h]; i >= 0; i = next[i]) {
            if (dp) b->res[i].data_platform_done = true;
            else b->res[i].email_done = true;
        }
    }
    free(table);
    free(next);
    if (granted) metrics_counter_add("ticketd_points_granted_total", NULL, (double)granted);
    b->cb(b->ud, b->res, NULL, false);
out:
    free(b->ids);
    free(b->res);
    free(b);
}

int effects_points_batch(struct effects *fx, const struct effects_event *const *evs, size_t n,
                         effects_points_fn cb, void *ud)
{
    if (n == 0 || n > POINTS_BATCH_MAX) return -EINVAL;
    struct points_batch *b = calloc(1, sizeof *b);
    struct strbuf cols[BATCH_COLUMNS_MAX] = {STRBUF_INIT};
    int rc = -ENOMEM;
    if (!b) return -ENOMEM;
    b->fx = fx;
    b->n = n;
    b->cb = cb;
    b->ud = ud;
    b->ids = malloc(n * sizeof *b->ids);
    b->res = calloc(n, sizeof *b->res);
    if (!b->ids || !b->res) goto fail;

    bool want_dp = effects_wants_data_platform(fx);
    char num[32];
    for (int col = 0; col < 7; col++) {
        pg_array_open(&cols[col]);
        for (size_t i = 0; i < n; i++) {
            const struct effects_event *ev = evs[i];
            const char *v = num;
            switch (col) {
            case 0: v = ev->event_id; break;
            case 1: snprintf(num, sizeof num, "%" PRId32, ev->partition); break;
            case 2: snprintf(num, sizeof num, "%" PRId64, ev->offset); break;
            case 3: snprintf(num, sizeof num, "%" PRId64, ev->application_id); break;
            case 4: v = ev->phone; break;
            case 5: v = want_dp ? "t" : "f"; break;
            default: v = effects_wants_email(fx, ev) ? "t" : "f"; break;
            }
            pg_array_text(&cols[col], v);
        }
        pg_array_close(&cols[col]);
    }
    if (columns_ok(cols, 7) != 0) goto fail;
    for (size_t i = 0; i < n; i++) {
        /* PostgreSQL returns uuids in lower case: match on that */
        for (size_t k = 0; k <= UUID_STR_LEN; k++) {
            char ch = evs[i]->event_id[k];
            b->ids[i][k] = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
        }
    }
    char points[16];
    snprintf(points, sizeof points, "%d", fx->cfg->points_per_application);
    const char *params[10];
    for (int col = 0; col < 7; col++) params[col] = strbuf_str(&cols[col]);
    params[7] = fx->group;
    params[8] = evs[0]->topic;
    params[9] = points;
    rc = query(fx, fx->points_stmt, points_sql, 10, params, on_points, b);
    columns_free(cols, 7);
    if (rc != 0) goto fail_nobuf;
    fx->inflight++;
    metrics_observe_buckets("ticketd_consumer_points_batch_size", NULL, (double)n, batch_bounds,
                            sizeof batch_bounds / sizeof *batch_bounds);
    return 0;
fail:
    columns_free(cols, 7);
fail_nobuf:
    free(b->ids);
    free(b->res);
    free(b);
    return rc;
}

static const char *kind_name(enum effects_kind k)
{
    return k == EFFECTS_DATA_PLATFORM ? "data_platform" : "email";
}

struct marks_batch {
    struct effects *fx;
    effects_marks_fn cb;
    void *ud;
};

static void on_marks(void *ud, const PGresult *res, const char *error)
{
    char msg[600];
    struct marks_batch *b = ud;
    b->fx->inflight--;
    if (res && PQresultStatus(res) == PGRES_COMMAND_OK) {
        b->cb(b->ud, true, NULL, false);
    } else {
        db_error(msg, sizeof msg, "", res, error);
        b->cb(b->ud, false, msg, dbp_error_is_ours(res));
    }
    free(b);
}

int effects_mark_batch(struct effects *fx, const struct effects_mark *marks, size_t n,
                       effects_marks_fn cb, void *ud)
{
    if (n == 0) return -EINVAL;
    struct marks_batch *b = calloc(1, sizeof *b);
    if (!b) return -ENOMEM;
    b->fx = fx;
    b->cb = cb;
    b->ud = ud;
    struct strbuf cols[BATCH_COLUMNS_MAX] = {STRBUF_INIT};
    char num[16];
    for (int col = 0; col < 5; col++) {
        pg_array_open(&cols[col]);
        for (size_t i = 0; i < n; i++) {
            const struct effects_mark *m = &marks[i];
            const char *v = num;
            switch (col) {
            case 0: v = m->event_id; break;
            case 1: v = kind_name(m->effect); break;
            case 2: v = m->done ? "t" : "f"; break;
            case 3: snprintf(num, sizeof num, "%d", m->tries); break;
            default: v = m->done ? NULL : m->error; break;
            }
            pg_array_text(&cols[col], v);
        }
        pg_array_close(&cols[col]);
    }
    int rc = -ENOMEM;
    if (columns_ok(cols, 5) == 0) {
        const char *params[5];
        for (int col = 0; col < 5; col++) params[col] = strbuf_str(&cols[col]);
        rc = query(fx, fx->marks_stmt, marks_sql, 5, params, on_marks, b);
    }
    columns_free(cols, 5);
    if (rc != 0) {
        free(b);
        return rc;
    }
    fx->inflight++;
    metrics_observe_buckets("ticketd_consumer_marks_batch_size", NULL, (double)n, batch_bounds,
                            sizeof batch_bounds / sizeof *batch_bounds);
    return 0;
}

struct claim {
    struct effects *fx;
    effects_claim_fn cb;
    void *ud;
};

static void on_claim(void *ud, const PGresult *res, const char *error)
{
    char msg[600];
    struct claim *k = ud;
    k->fx->inflight--;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        db_error(msg, sizeof msg, "email claim: ", res, error);
        k->cb(k->ud, EFFECTS_CLAIM_HELD, msg, dbp_error_is_ours(res));
    } else if (PQntuples(res) == 0) {
        k->cb(k->ud, EFFECTS_CLAIMED, NULL, false); /* no row to claim (cannot happen) */
    } else if (strcmp(PQgetvalue(res, 0, 0), "1") == 0) {
        k->cb(k->ud, EFFECTS_CLAIMED, NULL, false);
    } else {
        bool done = PQgetvalue(res, 0, 1)[0] == 't';
        k->cb(k->ud, done ? EFFECTS_CLAIM_DONE : EFFECTS_CLAIM_HELD, NULL, false);
    }
    free(k);
}

int effects_claim_email(struct effects *fx, const char *event_id, const char *token,
                        int64_t ttl_ms, effects_claim_fn cb, void *ud)
{
    struct claim *k = calloc(1, sizeof *k);
    if (!k) return -ENOMEM;
    k->fx = fx;
    k->cb = cb;
    k->ud = ud;
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%" PRId64, ttl_ms);
    const char *params[3] = {event_id, token, ttl};
    int rc = query(fx, fx->claim_stmt, claim_sql, 3, params, on_claim, k);
    if (rc != 0) {
        free(k);
        return rc;
    }
    fx->inflight++;
    return 0;
}

/* ---- external calls ---- */

struct call {
    struct effects *fx;
    enum effects_kind kind;
    char event_id[UUID_STR_LEN + 1];
    effects_call_fn cb;
    void *ud;
};

static void call_finish(struct call *k, const char *error_class, const char *message)
{
    char qb[600];
    struct effects_call_result r = {.ok = error_class == NULL, .error_class = error_class};
    char msg[512];
    if (error_class) {
        const char *effect = kind_name(k->kind);
        snprintf(msg, sizeof msg, "%s: %s", effect, message);
        ascii_only(msg);
        r.error_message = msg;
        char labels[64];
        snprintf(labels, sizeof labels, "effect=\"%s\"", effect);
        if (strcmp(error_class, "closing") != 0) /* shutdown aborts are not sink failures */
            metrics_counter_add("ticketd_sink_failures_total", labels, 1);
        log_warn("effects", "event=effect_failed event_id=%s effect=%s class=%s err=%s",
                 k->event_id, effect, error_class, log_quoted(message, qb, sizeof qb));
    }
    k->fx->inflight--;
    k->cb(k->ud, &r);
    free(k);
}

static void on_http_done(void *ud, const struct hc_result *res)
{
    struct call *k = ud;
    char msg[384];

    if (res->curl_code != 0) {
        snprintf(msg, sizeof msg, "%s", res->error);
        call_finish(k, strcmp(res->error, "closing") == 0 ? "closing" : "sink_transport", msg);
        return;
    }
    if (res->status < 200 || res->status > 299) {
        char body[128];
        log_quote(res->body, body, sizeof body);
        snprintf(msg, sizeof msg, "HTTP %ld %s", res->status, body);
        call_finish(k, "sink_status", msg);
        return;
    }
    call_finish(k, NULL, NULL);
}

static void on_smtp_done(void *ud, const struct hc_result *res)
{
    struct call *k = ud;
    char msg[384];

    if (res->curl_code != 0) {
        snprintf(msg, sizeof msg, "%s (reply %ld)", res->error, res->status);
        call_finish(k, strcmp(res->error, "closing") == 0 ? "closing" : "smtp", msg);
        return;
    }
    call_finish(k, NULL, NULL);
}

/* The CloudEvent in structured mode: the attributes plus the application as data. */
static char *cloudevent_json(const struct effects_event *ev, size_t *len)
{
    /* The value parsed once already (effects_parse); it is not NUL-terminated. */
    struct json_tokener *tok = json_tokener_new();
    json_object *data = tok ? json_tokener_parse_ex(tok, ev->value, (int)ev->value_len) : NULL;
    if (tok) json_tokener_free(tok);
    if (!data) return NULL;
    json_object *ce = json_object_new_object();
    json_object_object_add(ce, "specversion", json_object_new_string("1.0"));
    json_object_object_add(ce, "id", json_object_new_string(ev->event_id));
    json_object_object_add(ce, "source", json_object_new_string(CE_SOURCE_TICKETD));
    json_object_object_add(ce, "type", json_object_new_string(CE_TYPE_TICKET_APPLIED));
    if (ev->ce_time[0]) json_object_object_add(ce, "time", json_object_new_string(ev->ce_time));
    json_object_object_add(ce, "datacontenttype", json_object_new_string("application/json"));
    json_object_object_add(ce, "data", data);
    size_t n;
    const char *s = json_object_to_json_string_length(ce, JSON_C_TO_STRING_PLAIN, &n);
    char *copy = malloc(n + 1);
    if (copy) {
        memcpy(copy, s, n + 1);
        *len = n;
    }
    json_object_put(ce);
    return copy;
}

static char *email_message(const struct effects_event *ev, const struct cfg *cfg, size_t *len)
{
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
    char *msg = NULL;
    int n = asprintf(&msg,
                     "Date: %s\r\n"
                     "From: <%s>\r\n"
                     "To: <%s>\r\n"
                     "Message-ID: <%s@ticketd>\r\n"
                     "Subject: Your ticket application for %s was received\r\n"
                     "MIME-Version: 1.0\r\n"
                     "Content-Type: text/plain; charset=UTF-8\r\n"
                     "Content-Transfer-Encoding: 8bit\r\n"
                     "\r\n"
                     "Your application number %" PRId64 " for %s has been received.\r\n"
                     "Reference: %s\r\n",
                     date, cfg->mail_from, ev->email, ev->event_id, ev->ticket_event,
                     ev->application_id, ev->ticket_event, ev->event_id);
    if (n < 0) return NULL;
    *len = (size_t)n;
    return msg;
}

int effects_call(struct effects *fx, enum effects_kind kind, const struct effects_event *ev,
                 effects_call_fn cb, void *ud)
{
    const struct cfg *cfg = fx->cfg;
    if (fx->stopped) return -ECANCELED;
    struct call *k = calloc(1, sizeof *k);
    if (!k) return -ENOMEM;
    k->fx = fx;
    k->kind = kind;
    k->cb = cb;
    k->ud = ud;
    snprintf(k->event_id, sizeof k->event_id, "%s", ev->event_id);
    size_t len = 0;
    int rc;
    if (kind == EFFECTS_DATA_PLATFORM) {
        char *body = cloudevent_json(ev, &len);
        char idem[64 + UUID_STR_LEN];
        snprintf(idem, sizeof idem, "Idempotency-Key: %s", ev->event_id);
        const char *headers[] = {idem};
        rc = body ? hc_post_json(fx->hc, cfg->data_platform_url, headers, 1,
                                 "application/cloudevents+json; charset=UTF-8", body, len,
                                 cfg->http_timeout_ms, on_http_done, k)
                  : -ENOMEM;
        free(body);
    } else {
        char *msg = email_message(ev, cfg, &len);
        rc = msg ? hc_smtp_send(fx->hc, cfg->smtp_url, !cfg->smtp_allow_cleartext,
                                cfg->mail_from, ev->email, msg, len, cfg->http_timeout_ms,
                                on_smtp_done, k)
                 : -ENOMEM;
        free(msg);
    }
    if (rc != 0) {
        free(k);
        return rc;
    }
    fx->inflight++;
    return 0;
}
