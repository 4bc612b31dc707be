/* effects_batch: the group commit of the effects' statements (see effects_batch.h): one
 * points statement and one marks statement for many runs. */
#include "effects_batch.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_pool.h"
#include "log.h"
#include "metrics.h"
#include "pg_array.h"
#include "strbuf.h"

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

static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};

int fxb_prepare(struct effects *fx)
{
    fx->points_stmt = dbp_prepare(fx->db, points_sql);
    fx->marks_stmt = dbp_prepare(fx->db, marks_sql);
    if (fx->points_stmt < 0) fx->points_stmt = -1; /* falls back to unprepared statements */
    if (fx->marks_stmt < 0) fx->marks_stmt = -1;
    return 0;
}

const char *fxb_kind_name(enum effects_kind k)
{
    return k == EFFECTS_DATA_PLATFORM ? "data_platform" : "email";
}

/* Keeps printable ASCII only: error texts quote remote replies, and PostgreSQL text (and a
 * Kafka header read by humans) must not carry invalid UTF-8 or control bytes. */
void fxb_ascii_only(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) *s = '?';
}

void fxb_db_error(char *out, size_t n, const char *prefix, const struct pg_result *res,
                  const char *error)
{
    snprintf(out, n, "%s%s", prefix,
             error ? error : res ? PQresultErrorMessage(res) : "no result");
    size_t len = strlen(out);
    while (len && (out[len - 1] == '\n' || out[len - 1] == ' ')) out[--len] = '\0';
    fxb_ascii_only(out);
}

static int query(struct effects *fx, int stmt, const char *sql, int nparams,
                 const char *const *params, dbp_result_fn cb, void *ud)
{
    return stmt >= 0 ? dbp_query_prepared(fx->db, stmt, nparams, params, cb, ud)
                     : dbp_query(fx->db, sql, nparams, params, cb, ud);
}

/* ---- the ready and marks lists (intrusive, doubly linked) ---- */

static void queue_push(struct effects_run *r, enum fx_queue_id q)
{
    struct fx_queue *qu = &r->fx->queue[q];
    struct fx_link *l = &r->link[q];
    if (l->in) return;
    l->in = true;
    l->next = NULL;
    l->prev = qu->tail;
    if (qu->tail) qu->tail->link[q].next = r;
    else qu->head = r;
    qu->tail = r;
    qu->n++;
    fx_kick(r->fx);
}

static void queue_remove(struct effects_run *r, enum fx_queue_id q)
{
    struct fx_queue *qu = &r->fx->queue[q];
    struct fx_link *l = &r->link[q];
    if (!l->in) return;
    if (l->prev) l->prev->link[q].next = l->next;
    else qu->head = l->next;
    if (l->next) l->next->link[q].prev = l->prev;
    else qu->tail = l->prev;
    l->in = false;
    qu->n--;
}

void fxb_ready_push(struct effects_run *r) { queue_push(r, Q_READY); }
void fxb_ready_remove(struct effects_run *r) { queue_remove(r, Q_READY); }
void fxb_marks_push(struct effects_run *r) { queue_push(r, Q_MARKS); }
void fxb_marks_remove(struct effects_run *r) { queue_remove(r, Q_MARKS); }

/* ---- points: step 1 of many runs in one statement ---- */

struct points_batch {
    struct effects *fx;
    size_t n;
    char (*ids)[UUID_STR_LEN + 1];  /* lower-case event ids, by position */
    struct effects_run *runs[];
};

/* FNV-1a of an event id: the open-addressing table that matches result rows back to the
 * batch positions. */
static unsigned id_hash(const char *id)
{
    unsigned h = 2166136261u;
    for (; *id; id++) h = (h ^ (unsigned char)*id) * 16777619u;
    return h;
}

/* What the statement said of one run (NULL res: it failed). */
static void points_apply(struct effects_run *r, bool ok, bool granted, const bool done[2],
                         const char *error, bool db_fault)
{
    r->in_points = false;
    r->ops--;
    if (r->orphan) return; /* detached meanwhile: the result is dropped */
    if (!ok) {
        fx_run_fail(r, HOLD_POINTS, db_fault ? "db_unavailable" : "db", error, db_fault);
        return;
    }
    r->points_ok = true;
    for (int k = 0; k < 2; k++)
        if (r->ext[k].want && done[k]) r->ext[k].called = r->ext[k].committed = true;
    if (granted)
        log_debug("effects", "event=points_granted partition=%" PRId32 " offset=%" PRId64
                  " event_id=%s", r->ev.partition, r->ev.offset, r->ev.event_id);
    fx_run_check(r);
    fx_lane_pump_of(r);
}

static void points_failed(struct points_batch *b, const char *msg, bool db_fault)
{
    static const bool none[2];
    for (size_t i = 0; i < b->n; i++) points_apply(b->runs[i], false, false, none, msg, db_fault);
}

static void on_points(void *ud, const PGresult *res, const char *error)
{
    char msg[600], qb[700];
    struct points_batch *b = ud;
    struct effects *fx = b->fx;
    fx->inflight--;
    fx->points_inflight--;

    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        fxb_db_error(msg, sizeof msg, "points: ", res, error);
        metrics_counter_add("ticketd_sink_failures_total", "effect=\"points\"", (double)b->n);
        bool ours = dbp_error_is_ours(res); /* then the outage is logged once */
        log_at(ours ? LOG_DEBUG : LOG_WARN, "effects",
               "event=effect_failed effect=points events=%zu class=db err=%s", b->n,
               log_quoted(msg, qb, sizeof qb));
        points_failed(b, msg, ours);
        goto out;
    }
    /* position lists per id: head[slot] -> first position, next[pos] -> the following one */
    size_t cap = 16;
    while (cap < b->n * 2) cap *= 2;
    long *table = malloc(cap * sizeof *table);
    long *next = malloc(b->n * sizeof *next);
    bool *flags = calloc(b->n * 3, sizeof *flags); /* granted, data platform done, email done */
    if (!table || !next || !flags) {
        free(table);
        free(next);
        free(flags);
        points_failed(b, "points: out of memory", true);
        goto out;
    }
    fx_db_health(fx, true, NULL);
    for (size_t i = 0; i < cap; i++) table[i] = -1;
    for (size_t i = b->n; i-- > 0;) {
        size_t h = id_hash(b->ids[i]) & (cap - 1);
        while (table[h] >= 0 && strcmp(b->ids[table[h]], b->ids[i]) != 0) h = (h + 1) & (cap - 1);
        next[i] = table[h]; /* the same id seen at a later position, or -1 */
        table[h] = (long)i;
    }
    int rows = PQntuples(res);
    size_t granted = 0;
    for (int row = 0; row < rows; row++) {
        const char *kind = PQgetvalue(res, row, 0), *id = PQgetvalue(res, row, 1);
        size_t h = id_hash(id) & (cap - 1);
        while (table[h] >= 0 && strcmp(b->ids[table[h]], id) != 0) h = (h + 1) & (cap - 1);
        if (table[h] < 0) continue; /* not ours (cannot happen) */
        if (kind[0] == 'g') {
            flags[table[h] * 3] = true; /* the first position only */
            granted++;
            continue;
        }
        bool dp = strcmp(PQgetvalue(res, row, 2), "data_platform") == 0;
        for (long i = table[h]; i >= 0; i = next[i]) flags[i * 3 + (dp ? 1 : 2)] = true;
    }
    free(table);
    free(next);
    if (granted) metrics_counter_add("ticketd_points_granted_total", NULL, (double)granted);
    for (size_t i = 0; i < b->n; i++)
        points_apply(b->runs[i], true, flags[i * 3], &flags[i * 3 + 1], NULL, false);
    free(flags);
out:
    free(b->ids);
    free(b);
}

/* Sends the points step of the first POINTS_BATCH_CUT ready runs. */
static void send_points(struct effects *fx)
{
    size_t n = fx->queue[Q_READY].n < POINTS_BATCH_CUT ? fx->queue[Q_READY].n : POINTS_BATCH_CUT;
    struct points_batch *b = calloc(1, sizeof *b + n * sizeof b->runs[0]);
    struct strbuf cols[BATCH_COLUMNS_MAX] = {STRBUF_INIT};
    if (!b) return; /* out of memory: the next tick tries again */
    b->fx = fx;
    b->n = n;
    b->ids = malloc(n * sizeof *b->ids);
    if (!b->ids) {
        free(b);
        return;
    }
    struct effects_run *r = fx->queue[Q_READY].head;
    for (size_t i = 0; i < n; i++, r = r->link[Q_READY].next) b->runs[i] = r;

    char num[32];
    for (int col = 0; col < 7; col++) {
        pg_array_open(&cols[col]);
        for (size_t i = 0; i < n; i++) {
            const struct effects_run *x = b->runs[i];
            const struct effects_event *ev = &x->ev;
            const char *v = num;
            switch (col) {
            case 0: v = ev->event_id; break;
            case 1: snprintf(num, sizeof num, "%" PRId32, ev->partition); break;
            case 2: snprintf(num, sizeof num, "%" PRId64, ev->offset); break;
            case 3: snprintf(num, sizeof num, "%" PRId64, ev->application_id); break;
            case 4: v = ev->phone; break;
            case 5: v = x->ext[EFFECTS_DATA_PLATFORM].want ? "t" : "f"; break;
            default: v = x->ext[EFFECTS_EMAIL].want ? "t" : "f"; break;
            }
            pg_array_text(&cols[col], v);
        }
        pg_array_close(&cols[col]);
    }
    int rc = -ENOMEM;
    if (columns_ok(cols, 7) == 0) {
        for (size_t i = 0; i < n; i++) {
            /* PostgreSQL returns uuids in lower case: match on that */
            for (size_t k = 0; k <= UUID_STR_LEN; k++) {
                char ch = b->runs[i]->ev.event_id[k];
                b->ids[i][k] = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
            }
        }
        char points[16];
        snprintf(points, sizeof points, "%d", fx->cfg->points_per_application);
        const char *params[10];
        for (int col = 0; col < 7; col++) params[col] = strbuf_str(&cols[col]);
        params[7] = fx->group;
        params[8] = b->runs[0]->ev.topic;
        params[9] = points;
        rc = query(fx, fx->points_stmt, points_sql, 10, params, on_points, b);
    }
    columns_free(cols, 7);
    for (size_t i = 0; i < n; i++) fxb_ready_remove(b->runs[i]);
    if (rc != 0) {
        /* could not even start (database down, queue full): a failed attempt like any other */
        const char *why = rc == -ENOTCONN ? "points: database unavailable" : strerror(-rc);
        for (size_t i = 0; i < n; i++)
            fx_run_fail(b->runs[i], HOLD_POINTS, "db_unavailable", why, true);
        free(b->ids);
        free(b);
        return;
    }
    fx->inflight++;
    fx->points_inflight++;
    metrics_observe_buckets("ticketd_consumer_points_batch_size", NULL, (double)n, batch_bounds,
                            sizeof batch_bounds / sizeof *batch_bounds);
    for (size_t i = 0; i < n; i++) {
        b->runs[i]->in_points = true;
        b->runs[i]->ops++;
    }
}

/* ---- done marks: many runs in one statement ---- */

struct marks_batch {
    struct effects *fx;
    size_t n;
    struct effects_run *runs[];
};

static void marks_apply(struct effects_run *r, bool ok, const char *error, bool db_fault)
{
    bool done_failed = false;
    const char *effect = "";
    r->ops--;
    for (int k = 0; k < 2; k++) {
        struct fx_ext *e = &r->ext[k];
        if (!e->sent) continue;
        e->sent = false;
        if (ok) {
            if (e->sent_done) e->committed = true;
        } else if (e->sent_done) {
            /* the call happened but its done mark did not commit: the mark is retried
             * (not the call) */
            e->pending_tries += e->sent_tries;
            e->pending_done = true;
            done_failed = true;
            effect = fxb_kind_name((enum effects_kind)k);
        } else {
            char qb[600];
            log_warn("effects", "event=mark_failed_error event_id=%s err=%s", r->ev.event_id,
                     log_quoted(error, qb, sizeof qb));
        }
    }
    if (r->orphan) {
        /* released or detached: its done marks are still written, a few statements at most */
        if (done_failed && ++r->orphan_mark_tries < ORPHAN_MARK_TRIES) {
            fxb_marks_push(r);
        } else if (done_failed) {
            char qb[600];
            log_warn("effects", "event=done_mark_lost event_id=%s effect=%s err=%s"
                     " note=\"revoked partition: the next owner redoes it\"",
                     r->ev.event_id, effect, log_quoted(error, qb, sizeof qb));
        }
        return;
    }
    if (done_failed) {
        char msg[700];
        snprintf(msg, sizeof msg, "recording %s done: %s", effect, error ? error : "");
        fx_run_fail(r, HOLD_MARKS, db_fault ? "db_unavailable" : "db", msg, db_fault);
    } else {
        for (int k = 0; k < 2; k++)
            if (r->ext[k].pending_tries > 0 && !(r->hold & HOLD_MARKS)) fxb_marks_push(r);
    }
    fx_run_check(r);
}

static void on_marks(void *ud, const PGresult *res, const char *error)
{
    char msg[600];
    struct marks_batch *b = ud;
    struct effects *fx = b->fx;
    fx->inflight--;
    fx->marks_inflight--;
    bool ok = res && PQresultStatus(res) == PGRES_COMMAND_OK;
    bool ours = false;
    if (ok) {
        fx_db_health(fx, true, NULL);
    } else {
        fxb_db_error(msg, sizeof msg, "", res, error);
        ours = dbp_error_is_ours(res);
    }
    for (size_t i = 0; i < b->n; i++) marks_apply(b->runs[i], ok, ok ? NULL : msg, ours);
    free(b);
}

/* The marks of the first runs of the marks list (two effects each), in one UPDATE. Several
 * marks of one (event, effect) fold into one in SQL (done wins, tries add up). */
static void send_marks(struct effects *fx)
{
    size_t cap = fx->queue[Q_MARKS].n < MARKS_BATCH_CUT / 2 ? fx->queue[Q_MARKS].n : MARKS_BATCH_CUT / 2;
    struct marks_batch *b = malloc(sizeof *b + cap * sizeof b->runs[0]);
    struct strbuf cols[BATCH_COLUMNS_MAX] = {STRBUF_INIT};
    if (!b) return;
    b->fx = fx;
    b->n = 0;
    for (int col = 0; col < 5; col++) pg_array_open(&cols[col]);
    size_t nm = 0;
    char num[16];
    for (struct effects_run *r = fx->queue[Q_MARKS].head; r && b->n < cap; r = r->link[Q_MARKS].next) {
        b->runs[b->n++] = r;
        for (int k = 0; k < 2; k++) {
            struct fx_ext *e = &r->ext[k];
            if (e->pending_tries == 0 || e->sent) continue;
            nm++;
            pg_array_text(&cols[0], r->ev.event_id);
            pg_array_text(&cols[1], fxb_kind_name((enum effects_kind)k));
            pg_array_text(&cols[2], e->pending_done ? "t" : "f");
            snprintf(num, sizeof num, "%d", e->pending_tries);
            pg_array_text(&cols[3], num);
            pg_array_text(&cols[4], e->pending_done ? NULL
                                    : r->last_error ? r->last_error : "");
        }
    }
    for (int col = 0; col < 5; col++) pg_array_close(&cols[col]);
    int rc = nm ? -ENOMEM : -EINVAL;
    if (nm && columns_ok(cols, 5) == 0) {
        const char *params[5];
        for (int col = 0; col < 5; col++) params[col] = strbuf_str(&cols[col]);
        rc = query(fx, fx->marks_stmt, marks_sql, 5, params, on_marks, b);
    }
    columns_free(cols, 5);
    if (rc != 0) {
        /* not sent: the marks stay pending; a database that is down fails the runs */
        for (size_t i = 0; i < b->n; i++) {
            struct effects_run *r = b->runs[i];
            fxb_marks_remove(r);
            if (r->ext[0].pending_done || r->ext[1].pending_done)
                fx_run_fail(r, HOLD_MARKS, "db_unavailable",
                            "recording done: database unavailable", true);
        }
        free(b);
        return;
    }
    fx->inflight++;
    fx->marks_inflight++;
    metrics_observe_buckets("ticketd_consumer_marks_batch_size", NULL, (double)nm, batch_bounds,
                            sizeof batch_bounds / sizeof *batch_bounds);
    for (size_t i = 0; i < b->n; i++) {
        struct effects_run *r = b->runs[i];
        for (int k = 0; k < 2; k++) {
            struct fx_ext *e = &r->ext[k];
            if (e->pending_tries == 0 || e->sent) continue;
            e->sent = true;
            e->sent_tries = e->pending_tries;
            e->sent_done = e->pending_done;
            e->pending_tries = 0;
            e->pending_done = false;
        }
        fxb_marks_remove(r);
        r->ops++;
    }
}

bool fxb_cut(struct effects *fx)
{
    while (fx->queue[Q_MARKS].head && fx->marks_inflight < STATEMENTS_INFLIGHT && dbp_idle(fx->db) > 0) {
        size_t before = fx->queue[Q_MARKS].n;
        send_marks(fx);
        if (fx->queue[Q_MARKS].n >= before) break;
    }
    while (!fx->draining && fx->queue[Q_READY].head && fx->points_inflight < STATEMENTS_INFLIGHT &&
           dbp_idle(fx->db) > 0) {
        size_t before = fx->queue[Q_READY].n;
        send_points(fx);
        if (fx->queue[Q_READY].n >= before) break;
    }
    bool more = (fx->queue[Q_MARKS].head && fx->marks_inflight < STATEMENTS_INFLIGHT) ||
                (!fx->draining && fx->queue[Q_READY].head && fx->points_inflight < STATEMENTS_INFLIGHT);
    return more && dbp_idle(fx->db) > 0;
}
