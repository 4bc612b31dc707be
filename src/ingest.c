/* ingest: group commit of applications.
 *
 * Submissions wait on a FIFO. After each poll phase a uv_check handle cuts batches of up to
 * batch_max and sends one statement per batch, but only while a pool connection is idle and,
 * when a statement is in flight already, only a full batch (may_send): under load the FIFO
 * grows while a statement runs, so the next batch is bigger instead of queries queuing in the
 * pool or splitting over connections (one commit, one fsync, serves the whole batch). A
 * uv_idle handle runs only while a batch may be sent, so that a submission made outside the
 * poll phase does not wait for the poll to time out.
 *
 * Duplicates of one (event_id, phone) inside a batch are folded in C before sending: the
 * first in arrival order (the "leader") goes to the statement, the later ones ("followers")
 * take the leader's outcome (same id; 409, or the original 201 when their Idempotency-Key
 * matches the row's). The statement therefore never sees a key twice, and its result is
 * matched back by (event_id, phone) through a small hash table, which keeps the SQL free of
 * joins between CTEs (whose plans degrade to nested loops under generic plans). */
#include "ingest.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "limits.h"
#include "log.h"
#include "metrics.h"
#include "pg_array.h"

/* $1 event_id[], $2 phone[], $3 idempotency_key[], $4 name[], $5 email[], $6 seats[],
 * $7 fingerprint[] (hex): one element per distinct (event_id, phone) of the batch. Rows back
 * (kind, id, event_id, phone, idempotency_key, fingerprint hex, created_at, reference):
 *   'c' inserted now (key and fingerprint NULL: they are the input's);
 *   'e' the row of this (event_id, phone) that was there already in this statement's snapshot;
 *   'k' the row holding this input's Idempotency-Key, with the input's event_id and phone
 *       (the match-back key; the row itself may be another applicant's);
 *   'n' the NOTIFY ran (only when something was inserted); ignored.
 * ON CONFLICT has no target, so a row whose key is taken is skipped like one whose
 * (event_id, phone) is (a taken reference, at 122 random bits, does not happen). A key that
 * is in no set conflicted with a row another transaction committed after this statement's
 * snapshot was taken: ON CONFLICT saw it, the snapshot cannot, so it is looked up again by
 * ingest_lookup_sql. The LATERAL ... LIMIT 1 keeps the existing-row lookups per-key unique
 * index probes whatever the statistics say (a hash join would scan the whole table for every
 * batch once a cached generic plan chose it). Rows are inserted in (event_id, phone) order,
 * the same in every batch, so concurrent batches with overlapping keys cannot deadlock.
 *
 * The outbox event id (CloudEvents ce_id) is an RFC 9562 version-8 UUID: the application id
 * in the first 48 bits, then 74 random bits drawn once per statement (gen_random_uuid()'s).
 * It is unique because the application id is, and unguessable across databases because of
 * the random part; unlike a random v4 UUID it grows with the id, so its unique index takes
 * appends on its rightmost page instead of a random leaf per row (fewer pages dirtied, fewer
 * full-page images in the WAL after a checkpoint, one gen_random_uuid() per batch instead of
 * one per row). docs/PERFORMANCE.md has the measurements. The application's reference is a
 * random v4 UUID on purpose: it is what a stranger would have to guess. */
#define ROW_COLUMNS(a) "a.id, " a ".event_id, " a ".phone, a.idempotency_key, " \
    "encode(a.idempotency_fingerprint, 'hex'), " DBP_RFC3339_UTC("a.created_at") ", a.reference::text"
#define BY_PAIR(i) " CROSS JOIN LATERAL (SELECT * FROM applications x" \
    "  WHERE x.event_id = " i ".event_id AND x.phone = " i ".phone LIMIT 1) AS a"
#define BY_KEY(i) " CROSS JOIN LATERAL (SELECT * FROM applications x" \
    "  WHERE x.idempotency_key = " i ".idempotency_key LIMIT 1) AS a WHERE " i ".idempotency_key IS NOT NULL"
const char *const ingest_batch_sql =
    "WITH input AS ("
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[])"
    "  AS t(event_id, phone, idempotency_key, name, email, seats, fingerprint)"
    "), ins AS ("
    " INSERT INTO applications (event_id, phone, name, email, seats, idempotency_key,"
    "  idempotency_fingerprint)"
    " SELECT event_id, phone, name, email, seats, idempotency_key, decode(fingerprint, 'hex')"
    " FROM input ORDER BY event_id COLLATE \"C\", phone COLLATE \"C\""
    " ON CONFLICT DO NOTHING"
    " RETURNING id, event_id, phone, name, email, seats, reference,"
    "  " DBP_RFC3339_UTC("created_at") " AS created"
    "), rnd AS ("
    " SELECT substr(replace(gen_random_uuid()::text, '-', ''), 14) AS bits"
    "), ob AS ("
    " INSERT INTO outbox (event_id, aggregate_id, event_type, payload)"
    " SELECT (lpad(to_hex(id), 12, '0') || '8' || (SELECT bits FROM rnd))::uuid,"
    "  id, 'TicketApplied', jsonb_build_object('id', id, 'event_id', event_id,"
    "  'phone', phone, 'name', name, 'email', email, 'seats', seats, 'created_at', created)"
    " FROM ins ORDER BY id"
    " RETURNING id"
    /* The payload names the lowest new outbox id: batches on different connections can
     * commit out of id order, and the relay moves its cursor back below a late commit. */
    "), notified AS ("
    " SELECT pg_notify('outbox', min(id)::text) FROM ob HAVING count(*) > 0"
    "), probe AS (" /* look for existing rows only if something was not inserted */
    " SELECT 1 FROM (SELECT count(*) AS n FROM ins) c WHERE c.n < (SELECT count(*) FROM input)"
    ")"
    " SELECT 'c' AS kind, id, event_id, phone, NULL::text, NULL::text, created, reference::text"
    " FROM ins"
    " UNION ALL"
    " SELECT 'e', " ROW_COLUMNS("a") " FROM input i" BY_PAIR("i") " WHERE EXISTS (SELECT 1 FROM probe)"
    " UNION ALL"
    " SELECT 'k', " ROW_COLUMNS("i") " FROM input i" BY_KEY("i") " AND EXISTS (SELECT 1 FROM probe)"
    " UNION ALL"
    " SELECT 'n', NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM notified";

/* Follow-up for keys that conflicted with a concurrent commit: a new statement, a new
 * snapshot. $1 event_id[], $2 phone[], $3 idempotency_key[]; rows as kinds 'e' and 'k'. */
static const char ingest_lookup_sql[] =
    "WITH input AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
    "  AS t(event_id, phone, idempotency_key))"
    " SELECT 'e', " ROW_COLUMNS("a") " FROM input i" BY_PAIR("i")
    " UNION ALL"
    " SELECT 'k', " ROW_COLUMNS("i") " FROM input i" BY_KEY("i");

/* Walks applications in id order from a cursor, up to INGEST_PRUNE_BATCH rows, stopping before the first
 * row younger than the TTL, and clears the keys of the keyed ones: bounded work per
 * statement whatever the table size, and no index beyond the primary key. Rows back: the new
 * cursor, rows walked, keys cleared. */
const char *const ingest_prune_sql =
    "WITH r AS (SELECT id, created_at < now() - $2::bigint * interval '1 millisecond' AS old,"
    "  idempotency_key IS NOT NULL AS keyed FROM applications WHERE id > $1::bigint"
    "  ORDER BY id LIMIT " LIMITS_STR(INGEST_PRUNE_BATCH)
    "), upto AS (SELECT COALESCE(min(id) FILTER (WHERE NOT old) - 1, max(id), $1::bigint) AS v,"
    "  count(*) AS n FROM r"
    "), u AS (UPDATE applications a SET idempotency_key = NULL, idempotency_fingerprint = NULL"
    "  FROM r, upto WHERE a.id = r.id AND r.keyed AND r.old AND r.id <= upto.v RETURNING 1"
    ") SELECT upto.v, upto.n, (SELECT count(*) FROM u) FROM upto";

/* Where the walk starts: just below the oldest keyed row (a scan of the partial key index,
 * once per process), or near the end when there is none. */
static const char ingest_prune_start_sql[] =
    "SELECT COALESCE((SELECT min(id) - 1 FROM applications WHERE idempotency_key IS NOT NULL),"
    " (SELECT greatest(max(id) - " LIMITS_STR(INGEST_PRUNE_START_BACK) ", 0) FROM applications), 0)";

static const double batch_size_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048};

struct ingest_item {
    struct ingest_item *next; /* pending FIFO */
    uint64_t queued_ms;       /* uv_now() when submitted: its sojourn time is measured from it */
    ingest_done_fn done;
    void *ud;
    struct application_in app;
    char key[IDEMPOTENCY_KEY_MAX_BYTES + 1];
    char fingerprint[VALIDATE_FINGERPRINT_HEX + 1]; /* when has_key */
    bool has_key;
    unsigned short len_event_id, len_phone, len_name, len_email, len_key;
    struct ingest_item *key_next; /* chain in the in-flight key set (has_key) */
    uint32_t key_hash;

    /* while in a batch */
    int leader;               /* index of the first item with the same (event_id, phone) */
    bool resolved;            /* leader: res is final */
    bool delivered;
    /* leader, while its result is applied: the key and fingerprint of the row of its
     * (event_id, phone) (its own when CREATED, else pointing into the PGresult) */
    bool has_row;
    const char *row_key, *row_fingerprint;
    struct ingest_result res;
};

struct ingest_batch {
    struct ingest *ing;
    int n;                       /* items, arrival order */
    int nleaders;
    struct ingest_item **items;
    int *slots;                  /* open-addressing table of leader indexes, -1 = empty */
    unsigned mask;
    uint64_t t0;
    bool lookup;                 /* second phase: ingest_lookup_sql */
};

struct ingest {
    uv_loop_t *loop;
    struct dbp *db;
    int batch_max;
    size_t queue_max;
    uint64_t queue_wait_max_ms;
    unsigned jitter;             /* xorshift state for Retry-After */
    int stmt;                    /* prepared batch statement, or -1 */
    uv_check_t check;
    uv_idle_t idle;
    struct ingest_item *head, *tail;
    size_t npending;             /* waiting for a batch */
    size_t ninflight;            /* in batches not yet answered */
    int batches;                 /* batches in flight (each holds the struct alive) */
    int handles;                 /* open uv handles */
    bool closing;

    /* Idempotency-Keys queued or in flight, so that a second request with one waits for
     * nothing and gets KEY_IN_FLIGHT (chained hash set of items) */
    struct ingest_item **keys;
    unsigned keys_mask;

    /* pruning expired keys */
    int64_t key_ttl_ms;
    uv_timer_t prune_timer;
    int64_t prune_cursor;        /* applications.id below which keys are pruned; -1 unknown */
    bool prune_inflight;         /* a prune statement holds the struct alive */
};

/* ---- helpers ---- */

static void count_result(enum ingest_status st, double n)
{
    static const char *const labels[] = {
        [INGEST_CREATED] = "result=\"created\"",
        [INGEST_REPLAYED] = "result=\"replayed\"",
        [INGEST_DUPLICATE] = "result=\"duplicate\"",
        [INGEST_UNAVAILABLE] = "result=\"unavailable\"",
        [INGEST_OVERLOADED] = "result=\"overloaded\"",
        [INGEST_KEY_MISMATCH] = "result=\"key_mismatch\"",
        [INGEST_KEY_IN_FLIGHT] = "result=\"key_in_flight\"",
    };
    if (n > 0) metrics_counter_add("ticketd_ingest_applications_total", labels[st], n);
}

static void maybe_free(struct ingest *ing)
{
    if (ing->closing && ing->handles == 0 && ing->batches == 0 && !ing->prune_inflight) {
        free(ing->keys);
        free(ing);
    }
}

static void answer_now(ingest_done_fn done, void *ud, enum ingest_status st, const char *error)
{
    struct ingest_result res = {.status = st, .error = error};
    count_result(st, 1);
    done(ud, &res);
}

static uint32_t key_hash(const char *event_id, size_t elen, const char *phone, size_t plen)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < elen; i++) h = (h ^ (unsigned char)event_id[i]) * 16777619u;
    h = (h ^ 0xffu) * 16777619u;
    for (size_t i = 0; i < plen; i++) h = (h ^ (unsigned char)phone[i]) * 16777619u;
    return h;
}

static uint32_t text_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static struct ingest_item **key_bucket(struct ingest *ing, uint32_t hash)
{
    return &ing->keys[hash & ing->keys_mask];
}

static bool key_in_flight(struct ingest *ing, const char *key, size_t len, uint32_t hash)
{
    for (const struct ingest_item *it = *key_bucket(ing, hash); it; it = it->key_next)
        if (it->key_hash == hash && it->len_key == len && memcmp(it->key, key, len) == 0) return true;
    return false;
}

/* Takes the item's key out of the in-flight set (before it is answered). */
static void key_release(struct ingest *ing, struct ingest_item *it)
{
    if (!it->has_key) return;
    for (struct ingest_item **pp = key_bucket(ing, it->key_hash); *pp; pp = &(*pp)->key_next) {
        if (*pp == it) {
            *pp = it->key_next;
            break;
        }
    }
    it->key_next = NULL;
}

/* Finds the leader slot for (event_id, phone): returns the slot index; *found tells whether
 * it holds a leader already. */
static unsigned slot_find(const struct ingest_batch *b, const char *event_id, size_t elen,
                          const char *phone, size_t plen, bool *found)
{
    unsigned i = key_hash(event_id, elen, phone, plen) & b->mask;
    for (;; i = (i + 1) & b->mask) {
        int idx = b->slots[i];
        if (idx < 0) {
            *found = false;
            return i;
        }
        const struct ingest_item *it = b->items[idx];
        if (it->len_event_id == elen && it->len_phone == plen &&
            memcmp(it->app.event_id, event_id, elen) == 0 && memcmp(it->app.phone, phone, plen) == 0) {
            *found = true;
            return i;
        }
    }
}

/* The lookup statement takes the first NLOOKUP_COLUMNS. */
enum column { COL_EVENT_ID, COL_PHONE, COL_KEY, COL_NAME, COL_EMAIL, COL_SEATS, COL_FINGERPRINT,
              NCOLUMNS };
#define NLOOKUP_COLUMNS 3

/* Builds the array literals for the batch's leaders (ncols columns) into one buffer;
 * params[c] points at each. Returns the buffer (caller frees) or NULL. */
static char *build_arrays(const struct ingest_batch *b, bool only_unresolved, int ncols,
                          const char *params[NCOLUMNS])
{
    size_t cap = (size_t)ncols * 3;
    for (int i = 0; i < b->n; i++) {
        const struct ingest_item *it = b->items[i];
        if (it->leader != i || (only_unresolved && it->resolved)) continue;
        /* worst case every byte escaped, plus quotes and a comma per element */
        cap += 2u * (it->len_event_id + it->len_phone + it->len_name + it->len_email + it->len_key) +
               VALIDATE_FINGERPRINT_HEX + 7 * 3 + 12 + 4;
    }
    struct strbuf buf = STRBUF_INIT;
    size_t offsets[NCOLUMNS];
    strbuf_reserve(&buf, cap); /* one allocation: the literals never grow it */
    for (int c = 0; c < ncols; c++) {
        offsets[c] = buf.len;
        pg_array_open(&buf);
        for (int i = 0; i < b->n; i++) {
            const struct ingest_item *it = b->items[i];
            if (it->leader != i || (only_unresolved && it->resolved)) continue;
            switch ((enum column)c) {
            case COL_EVENT_ID: pg_array_textn(&buf, it->app.event_id, it->len_event_id); break;
            case COL_PHONE: pg_array_textn(&buf, it->app.phone, it->len_phone); break;
            case COL_NAME: pg_array_textn(&buf, it->app.name, it->len_name); break;
            case COL_EMAIL:
                pg_array_textn(&buf, it->len_email ? it->app.email : NULL, it->len_email);
                break;
            case COL_SEATS: pg_array_int(&buf, it->app.seats); break;
            case COL_KEY: pg_array_textn(&buf, it->has_key ? it->key : NULL, it->len_key); break;
            case COL_FINGERPRINT:
                pg_array_textn(&buf, it->has_key ? it->fingerprint : NULL, VALIDATE_FINGERPRINT_HEX);
                break;
            case NCOLUMNS: break;
            }
        }
        pg_array_close(&buf);
        strbuf_append(&buf, "", 1); /* each literal ends with its own NUL */
    }
    if (buf.failed) {
        strbuf_free(&buf);
        return NULL;
    }
    for (int c = 0; c < ncols; c++) params[c] = buf.p + offsets[c];
    return strbuf_take(&buf);
}

/* ---- batches ---- */

static void on_batch_result(void *ud, const PGresult *res, const char *error);

static void batch_free(struct ingest_batch *b)
{
    for (int i = 0; i < b->n; i++) free(b->items[i]);
    free(b);
}

/* The one way an item in a batch is answered. */
static void deliver(struct ingest *ing, struct ingest_item *it)
{
    it->delivered = true;
    ing->ninflight--;
    key_release(ing, it);
    it->done(it->ud, &it->res);
}

/* Answers every item not yet answered: resolved ones with their result, the rest with
 * UNAVAILABLE. Then frees the batch and releases its hold on the ingest. */
static void batch_finish(struct ingest_batch *b, const char *why)
{
    struct ingest *ing = b->ing;
    size_t counts[INGEST_NSTATUS] = {0};
    for (int i = 0; i < b->n; i++) {
        struct ingest_item *it = b->items[i];
        if (it->delivered) continue;
        if (!it->resolved) {
            it->res = (struct ingest_result){.status = INGEST_UNAVAILABLE, .error = why};
            it->resolved = true;
        }
        counts[it->res.status]++;
    }
    for (int st = 0; st < INGEST_NSTATUS; st++) count_result((enum ingest_status)st, (double)counts[st]);
    for (int i = 0; i < b->n; i++)
        if (!b->items[i]->delivered) deliver(ing, b->items[i]);
    batch_free(b);
    ing->batches--;
    maybe_free(ing);
}

static void copy_field(char *dst, size_t cap, const PGresult *res, int r, int c)
{
    size_t len = (size_t)PQgetlength(res, r, c);
    if (len >= cap) len = cap - 1;
    memcpy(dst, PQgetvalue(res, r, c), len);
    dst[len] = '\0';
}

/* The outcome of an item with this key and fingerprint against a stored row. */
static enum ingest_status against_row(const struct ingest_item *it, const char *row_key,
                                      const char *row_fingerprint)
{
    if (!it->has_key || !row_key || strcmp(it->key, row_key) != 0) return INGEST_DUPLICATE;
    return row_fingerprint && strcmp(it->fingerprint, row_fingerprint) == 0 ? INGEST_REPLAYED
                                                                            : INGEST_KEY_MISMATCH;
}

/* Resolves leader l from row r of res. */
static void resolve_from_row(struct ingest_item *l, const PGresult *res, int r, enum ingest_status st)
{
    l->resolved = true;
    l->res.status = st;
    l->res.error = NULL;
    l->res.id = strtoll(PQgetvalue(res, r, 1), NULL, 10);
    copy_field(l->res.created_at, sizeof l->res.created_at, res, r, 6);
    copy_field(l->res.reference, sizeof l->res.reference, res, r, 7);
}

/* Applies the rows of a batch or lookup result to the leaders. Returns false when the
 * result is not usable (then the whole batch is answered UNAVAILABLE).
 * Kinds are applied in a fixed order whatever order they arrive in: 'c' (created), then 'k'
 * (the input's key is stored: replay or mismatch), then 'e' (its (event_id, phone) exists
 * under another key or none: duplicate). */
static bool apply_rows(struct ingest_batch *b, const PGresult *res)
{
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != 8) return false;
    int rows = PQntuples(res);
    static const char order[] = {'c', 'k', 'e'};
    for (size_t pass = 0; pass < sizeof order; pass++) {
        for (int r = 0; r < rows; r++) {
            char kind = PQgetvalue(res, r, 0)[0];
            if (kind != order[pass]) continue;
            bool found;
            unsigned slot = slot_find(b, PQgetvalue(res, r, 2), (size_t)PQgetlength(res, r, 2),
                                      PQgetvalue(res, r, 3), (size_t)PQgetlength(res, r, 3), &found);
            if (!found) continue;
            struct ingest_item *l = b->items[b->slots[slot]];
            const char *row_key = PQgetisnull(res, r, 4) ? NULL : PQgetvalue(res, r, 4);
            const char *row_fp = PQgetisnull(res, r, 5) ? NULL : PQgetvalue(res, r, 5);
            if (kind == 'e' && !l->has_row) {
                l->has_row = true; /* followers compare their keys with it */
                l->row_key = row_key;
                l->row_fingerprint = row_fp;
            }
            if (l->resolved) continue;
            if (kind == 'c') {
                resolve_from_row(l, res, r, INGEST_CREATED);
                l->has_row = true;
                l->row_key = l->has_key ? l->key : NULL;
                l->row_fingerprint = l->has_key ? l->fingerprint : NULL;
            } else if (kind == 'k') {
                /* The key is taken: by this very request earlier (same fingerprint, which
                 * covers event_id and phone) or by another body. */
                enum ingest_status st = against_row(l, row_key, row_fp);
                resolve_from_row(l, res, r, st == INGEST_REPLAYED ? st : INGEST_KEY_MISMATCH);
                if (st == INGEST_REPLAYED) {
                    l->has_row = true;
                    l->row_key = l->key;
                    l->row_fingerprint = l->fingerprint;
                }
            } else {
                resolve_from_row(l, res, r, INGEST_DUPLICATE);
            }
            if (l->res.status == INGEST_DUPLICATE || l->res.status == INGEST_KEY_MISMATCH)
                l->res.reference[0] = '\0'; /* never hand out another request's reference */
        }
    }
    /* Followers (same (event_id, phone) later in the batch, never the same key: that one is
     * refused at submission) take the leader's row: replay when their key is the row's key,
     * else duplicate. A leader refused for its key inserted nothing, so its followers were
     * never tried: they get UNAVAILABLE and may retry at once. */
    for (int i = 0; i < b->n; i++) {
        struct ingest_item *it = b->items[i];
        if (it->leader == i || it->resolved) continue;
        const struct ingest_item *l = b->items[it->leader];
        if (!l->resolved) continue;
        it->resolved = true;
        it->res = l->res;
        if (!l->has_row) {
            it->res = (struct ingest_result){.status = INGEST_UNAVAILABLE,
                                             .error = "an earlier request of the batch failed its key check"};
            continue;
        }
        it->res.status = against_row(it, l->row_key, l->row_fingerprint);
        if (it->res.status != INGEST_REPLAYED) it->res.reference[0] = '\0';
    }
    /* row_key points into res, which is cleared after this callback */
    for (int i = 0; i < b->n; i++) {
        b->items[i]->has_row = false;
        b->items[i]->row_key = b->items[i]->row_fingerprint = NULL;
    }
    return true;
}

static int batch_send(struct ingest_batch *b)
{
    struct ingest *ing = b->ing;
    const char *params[NCOLUMNS];
    int ncols = b->lookup ? NLOOKUP_COLUMNS : NCOLUMNS;
    char *buf = build_arrays(b, b->lookup, ncols, params);
    if (!buf) return -ENOMEM;
    int rc;
    if (b->lookup)
        rc = dbp_query(ing->db, ingest_lookup_sql, ncols, params, on_batch_result, b);
    else if (ing->stmt >= 0)
        rc = dbp_query_prepared(ing->db, ing->stmt, ncols, params, on_batch_result, b);
    else
        rc = dbp_query(ing->db, ingest_batch_sql, ncols, params, on_batch_result, b);
    free(buf);
    return rc;
}

static void on_batch_result(void *ud, const PGresult *res, const char *error)
{
    struct ingest_batch *b = ud;
    if (!apply_rows(b, res)) {
        const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
        char q[300];
        log_quote(error ? error : "unexpected result", q, sizeof q);
        log_warn("ingest", "event=batch_failed phase=%s size=%d sqlstate=%s error=%s",
                 b->lookup ? "lookup" : "insert", b->n, sqlstate ? sqlstate : "-", q);
        metrics_counter_add("ticketd_group_commit_batches_total", "result=\"error\"", 1);
        batch_finish(b, res ? "database error" : "database connection lost: outcome unknown");
        return;
    }
    if (!b->lookup) {
        double secs = (double)(uv_hrtime() - b->t0) / 1e9;
        metrics_observe_buckets("ticketd_group_commit_batch_size", NULL, b->n, batch_size_bounds,
                                sizeof batch_size_bounds / sizeof batch_size_bounds[0]);
        metrics_observe("ticketd_group_commit_duration_seconds", NULL, secs);
        metrics_counter_add("ticketd_group_commit_batches_total", "result=\"ok\"", 1);
    }
    int unresolved = 0;
    for (int i = 0; i < b->n; i++)
        if (b->items[i]->leader == i && !b->items[i]->resolved) unresolved++;
    if (unresolved == 0 || b->lookup) {
        batch_finish(b, "row not found after a conflict");
        return;
    }
    /* Some keys conflicted with rows committed concurrently: never answer without knowing
     * which row (a replay needs its reference), so look them up in a fresh snapshot first. Resolved items are answered now. */
    metrics_counter_add("ticketd_group_commit_lookups_total", NULL, unresolved);
    struct ingest *ing = b->ing;
    b->lookup = true;
    int rc = batch_send(b);
    if (rc < 0) {
        batch_finish(b, "database unavailable");
        return;
    }
    for (int i = 0; i < b->n; i++) {
        struct ingest_item *it = b->items[i];
        if (!it->resolved || it->delivered) continue;
        count_result(it->res.status, 1);
        deliver(ing, it);
    }
}

/* Cuts one batch from the head of the FIFO. */
static struct ingest_batch *batch_cut(struct ingest *ing)
{
    int n = ing->npending < (size_t)ing->batch_max ? (int)ing->npending : ing->batch_max;
    unsigned cap = 4;
    while (cap < 2u * (unsigned)n) cap <<= 1;
    size_t size = sizeof(struct ingest_batch) + (size_t)n * sizeof(struct ingest_item *) +
                  cap * sizeof(int);
    struct ingest_batch *b = malloc(size);
    if (!b) return NULL;
    b->ing = ing;
    b->n = n;
    b->nleaders = 0;
    b->items = (struct ingest_item **)(b + 1);
    b->slots = (int *)(b->items + n);
    b->mask = cap - 1;
    b->lookup = false;
    b->t0 = uv_hrtime();
    memset(b->slots, 0xff, cap * sizeof(int));
    for (int i = 0; i < n; i++) {
        struct ingest_item *it = ing->head;
        ing->head = it->next;
        it->next = NULL;
        b->items[i] = it;
        bool found;
        unsigned slot = slot_find(b, it->app.event_id, it->len_event_id, it->app.phone,
                                  it->len_phone, &found);
        if (found) {
            it->leader = b->slots[slot];
        } else {
            b->slots[slot] = i;
            it->leader = i;
            b->nleaders++;
        }
    }
    if (!ing->head) ing->tail = NULL;
    ing->npending -= (size_t)n;
    ing->ninflight += (size_t)n;
    ing->batches++;
    return b;
}

static void fail_pending(struct ingest *ing, const char *why)
{
    size_t n = ing->npending;
    struct ingest_item *it = ing->head;
    ing->head = ing->tail = NULL;
    ing->npending = 0;
    count_result(INGEST_UNAVAILABLE, (double)n);
    while (it) {
        struct ingest_item *next = it->next;
        struct ingest_result res = {.status = INGEST_UNAVAILABLE, .error = why};
        key_release(ing, it);
        it->done(it->ud, &res);
        free(it);
        it = next;
    }
}

static void on_idle(uv_idle_t *h)
{
    (void)h; /* only keeps the loop from blocking in poll; the check handle does the work */
}

/* Whether a batch may be sent now. With nothing in flight, at once (an idle service adds no
 * latency). With a statement in flight, only a big batch (a quarter of batch_max): the
 * applications that arrive meanwhile wait for it and go together in the next statement.
 * Under closed-loop load this keeps batches at about half the clients instead of splitting
 * them over every idle connection (64 clients, 4 connections: 32 per statement instead of
 * 13), so the cost of a statement beyond its rows (commit, WAL flush, executor start,
 * wake-ups) is paid less often: PostgreSQL's CPU per application fell by about a third
 * (docs/PERFORMANCE.md). A backlog that big means one statement at a time no longer keeps
 * up, so further idle connections are used. */
static bool may_send(const struct ingest *ing)
{
    if (!ing->head || dbp_idle(ing->db) == 0) return false;
    return ing->batches == 0 || ing->npending >= ((size_t)ing->batch_max + 3) / 4;
}

static void flush(struct ingest *ing)
{
    while (may_send(ing)) {
        struct ingest_batch *b = batch_cut(ing);
        if (!b) break; /* out of memory: retry next turn */
        int rc = batch_send(b);
        if (rc < 0) {
            const char *why = rc == -ENOTCONN ? "database unavailable"
                              : rc == -EAGAIN ? "database queue full"
                                              : "could not send batch";
            batch_finish(b, why);
        }
    }
    if (ing->head && dbp_connected(ing->db) == 0) fail_pending(ing, "database unavailable");
    /* Stay awake only while there is something to send and a connection to send it on; when
     * every connection is busy, their results wake the loop. */
    if (may_send(ing)) uv_idle_start(&ing->idle, on_idle);
    else uv_idle_stop(&ing->idle);
}

static void on_check(uv_check_t *h)
{
    struct ingest *ing = h->data;
    if (ing->head) flush(ing);
}

/* ---- expiry of Idempotency-Keys ---- */

static void on_prune_timer(uv_timer_t *t);

/* A quarter of the TTL (so a key lives at most 1.25 TTL), between 100 ms and a minute. */
static uint64_t prune_interval_ms(const struct ingest *ing)
{
    int64_t ms = ing->key_ttl_ms / 4;
    return (uint64_t)(ms < INGEST_PRUNE_EVERY_MIN_MS   ? INGEST_PRUNE_EVERY_MIN_MS
                      : ms > INGEST_PRUNE_EVERY_MAX_MS ? INGEST_PRUNE_EVERY_MAX_MS
                                                       : ms);
}

static void on_prune_result(void *ud, const PGresult *res, const char *error)
{
    struct ingest *ing = ud;
    ing->prune_inflight = false;
    uint64_t next = prune_interval_ms(ing);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        char q[300];
        log_quote(error ? error : (res ? PQresultErrorMessage(res) : "no result"), q, sizeof q);
        log_warn("ingest", "event=key_prune_failed error=%s", q);
    } else if (ing->prune_cursor < 0) {
        ing->prune_cursor = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        next = 0;
    } else {
        int64_t cursor = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        long walked = strtol(PQgetvalue(res, 0, 1), NULL, 10);
        long cleared = strtol(PQgetvalue(res, 0, 2), NULL, 10);
        if (cleared > 0) {
            metrics_counter_add("ticketd_idempotency_keys_pruned_total", NULL, (double)cleared);
            log_debug("ingest", "event=keys_pruned count=%ld upto=%lld", cleared, (long long)cursor);
        }
        /* a full range that moved on: more may be due, go on after the loop had a turn */
        if (walked >= INGEST_PRUNE_BATCH && cursor > ing->prune_cursor) next = 10;
        ing->prune_cursor = cursor;
    }
    if (ing->closing) maybe_free(ing);
    else uv_timer_start(&ing->prune_timer, on_prune_timer, next, 0);
}

static void on_prune_timer(uv_timer_t *t)
{
    struct ingest *ing = t->data;
    if (ing->closing) return;
    /* Only on a connection nobody waits for: applications go first. */
    if (dbp_idle(ing->db) == 0 || ing->head) {
        uv_timer_start(&ing->prune_timer, on_prune_timer, prune_interval_ms(ing), 0);
        return;
    }
    char cursor[24], ttl[24];
    snprintf(cursor, sizeof cursor, "%lld", (long long)ing->prune_cursor);
    snprintf(ttl, sizeof ttl, "%lld", (long long)ing->key_ttl_ms);
    const char *params[2] = {cursor, ttl};
    int rc = ing->prune_cursor < 0
                 ? dbp_query(ing->db, ingest_prune_start_sql, 0, NULL, on_prune_result, ing)
                 : dbp_query(ing->db, ingest_prune_sql, 2, params, on_prune_result, ing);
    if (rc == 0) ing->prune_inflight = true;
    else uv_timer_start(&ing->prune_timer, on_prune_timer, prune_interval_ms(ing), 0);
}

/* ---- public API ---- */

int ingest_create(struct ingest **out, uv_loop_t *loop, struct dbp *db,
                  const struct ingest_opts *opts)
{
    if (!out || !loop || !db || !opts || opts->batch_max < 1 || opts->queue_max < 1) return -EINVAL;
    struct ingest *ing = calloc(1, sizeof *ing);
    if (!ing) return -ENOMEM;
    ing->loop = loop;
    ing->db = db;
    ing->batch_max = opts->batch_max;
    ing->queue_max = (size_t)opts->queue_max;
    unsigned buckets = 16;
    while (buckets < (unsigned)opts->queue_max && buckets < (1u << 16)) buckets <<= 1;
    ing->keys = calloc(buckets, sizeof *ing->keys);
    if (!ing->keys) {
        free(ing);
        return -ENOMEM;
    }
    ing->keys_mask = buckets - 1;
    ing->key_ttl_ms = opts->key_ttl_ms;
    ing->prune_cursor = -1;
    ing->queue_wait_max_ms = opts->queue_wait_max_ms;
    ing->jitter = (unsigned)uv_hrtime() | 1u;
    ing->stmt = dbp_prepare(db, ingest_batch_sql);
    if (ing->stmt < 0) ing->stmt = -1; /* falls back to unprepared statements */
    uv_check_init(loop, &ing->check);
    uv_idle_init(loop, &ing->idle);
    uv_timer_init(loop, &ing->prune_timer);
    ing->check.data = ing;
    ing->idle.data = ing;
    ing->prune_timer.data = ing;
    ing->handles = 3;
    uv_check_start(&ing->check, on_check);
    uv_unref((uv_handle_t *)&ing->check); /* work in flight keeps the loop alive, not this */
    uv_unref((uv_handle_t *)&ing->prune_timer);
    if (ing->key_ttl_ms > 0) uv_timer_start(&ing->prune_timer, on_prune_timer, prune_interval_ms(ing), 0);

    metrics_describe("ticketd_group_commit_batch_size", "histogram",
                     "Applications per group-commit statement");
    metrics_describe("ticketd_group_commit_duration_seconds", "histogram",
                     "Group-commit statement latency (send to result)");
    metrics_describe("ticketd_group_commit_batches_total", "counter",
                     "Group-commit statements by outcome");
    metrics_describe("ticketd_group_commit_lookups_total", "counter",
                     "Keys looked up again after conflicting with a concurrent commit");
    metrics_describe("ticketd_ingest_applications_total", "counter",
                     "Applications submitted to ingest, by result");
    metrics_describe("ticketd_idempotency_keys_pruned_total", "counter",
                     "Idempotency-Keys cleared after IDEMPOTENCY_KEY_TTL");
    log_info("ingest", "event=start batch_max=%d queue_max=%d prepared=%s", ing->batch_max,
             opts->queue_max, ing->stmt >= 0 ? "yes" : "no");
    *out = ing;
    return 0;
}

/* Everything accepted here must be storable as is: one bad element would fail the whole
 * batch for everybody in it. validate.c guarantees it; this is a cheap guard. */
static bool storable(const struct application_in *app, size_t elen, size_t plen, size_t nlen,
                     size_t mlen)
{
    return elen > 0 && elen <= EVENT_ID_MAX_CHARS && plen > 0 && plen <= PHONE_DIGITS_MAX &&
           nlen > 0 && nlen <= NAME_MAX_BYTES && mlen <= EMAIL_MAX_BYTES &&
           validate_utf8_text(app->name, nlen) > 0 &&
           (mlen == 0 || validate_utf8_text(app->email, mlen) > 0) &&
           validate_event_id(app->event_id, elen);
}

/* Admission control (CoDel's sojourn time, as "Fail at Scale" applies it to request
 * queues): when the oldest queued application has waited longer than queue_wait_max, a new
 * one would wait at least as long, so it is refused at once with a jittered Retry-After
 * (1-3 s, so refused clients do not come back in step) rather than queued behind a backlog
 * that a stalled database or a rush past capacity is not draining. Applications already
 * queued keep their place: first come stays first served for whoever got in. */
static bool over_admission(struct ingest *ing, const char **why)
{
    if (ing->npending + ing->ninflight >= ing->queue_max) {
        *why = "ingest queue full";
        return true;
    }
    if (ing->queue_wait_max_ms && ing->head &&
        uv_now(ing->loop) - ing->head->queued_ms > ing->queue_wait_max_ms) {
        *why = "queue wait over QUEUE_WAIT_MAX";
        return true;
    }
    return false;
}

static void answer_overloaded(struct ingest *ing, ingest_done_fn done, void *ud, const char *why)
{
    ing->jitter ^= ing->jitter << 13;
    ing->jitter ^= ing->jitter >> 17;
    ing->jitter ^= ing->jitter << 5;
    struct ingest_result res = {.status = INGEST_OVERLOADED, .created_at = "", .error = why,
                                .retry_after_s = 1 + (int)(ing->jitter % 3)};
    count_result(INGEST_OVERLOADED, 1);
    done(ud, &res);
}

void ingest_submit(struct ingest *ing, const struct application_in *app,
                   const char *idempotency_key, ingest_done_fn done, void *ud)
{
    const char *why;
    if (ing->closing) {
        answer_now(done, ud, INGEST_UNAVAILABLE, "shutting down");
        return;
    }
    if (over_admission(ing, &why)) {
        answer_overloaded(ing, done, ud, why);
        return;
    }
    if (dbp_connected(ing->db) == 0) {
        answer_now(done, ud, INGEST_UNAVAILABLE, "database unavailable");
        return;
    }
    size_t elen = strnlen(app->event_id, sizeof app->event_id);
    size_t plen = strnlen(app->phone, sizeof app->phone);
    size_t nlen = strnlen(app->name, sizeof app->name);
    size_t mlen = strnlen(app->email, sizeof app->email);
    if (elen == sizeof app->event_id || plen == sizeof app->phone || nlen == sizeof app->name ||
        mlen == sizeof app->email || !storable(app, elen, plen, nlen, mlen)) {
        log_error("ingest", "event=rejected_unvalidated_application");
        answer_now(done, ud, INGEST_UNAVAILABLE, "invalid application");
        return;
    }
    struct ingest_item *it = malloc(sizeof *it);
    if (!it) {
        answer_now(done, ud, INGEST_OVERLOADED, "out of memory");
        return;
    }
    it->next = NULL;
    it->queued_ms = uv_now(ing->loop);
    it->done = done;
    it->ud = ud;
    it->app = *app;
    it->len_event_id = (unsigned short)elen;
    it->len_phone = (unsigned short)plen;
    it->len_name = (unsigned short)nlen;
    it->len_email = (unsigned short)mlen;
    it->has_key = false;
    it->len_key = 0;
    it->key[0] = '\0';
    it->key_next = NULL;
    if (idempotency_key && *idempotency_key) {
        size_t klen = strnlen(idempotency_key, IDEMPOTENCY_KEY_MAX_BYTES + 1);
        if (klen <= IDEMPOTENCY_KEY_MAX_BYTES && validate_utf8_text(idempotency_key, klen) > 0) {
            uint32_t hash = text_hash(idempotency_key, klen);
            if (key_in_flight(ing, idempotency_key, klen, hash)) {
                free(it);
                answer_now(done, ud, INGEST_KEY_IN_FLIGHT, "idempotency key in flight");
                return;
            }
            memcpy(it->key, idempotency_key, klen + 1);
            it->len_key = (unsigned short)klen;
            it->has_key = true;
            it->key_hash = hash;
            validate_fingerprint(app, it->fingerprint);
            struct ingest_item **bucket = key_bucket(ing, hash);
            it->key_next = *bucket;
            *bucket = it;
        } else {
            /* api.c answers 400 for such keys; never let one fail a batch */
            log_warn("ingest", "event=idempotency_key_ignored reason=not_storable");
        }
    }
    it->leader = -1;
    it->resolved = it->delivered = it->has_row = false;
    it->row_key = it->row_fingerprint = NULL;
    memset(&it->res, 0, sizeof it->res);
    if (ing->tail) ing->tail->next = it;
    else ing->head = it;
    ing->tail = it;
    ing->npending++;
    if (may_send(ing)) uv_idle_start(&ing->idle, on_idle);
}

size_t ingest_pending(const struct ingest *ing)
{
    return ing->npending + ing->ninflight;
}

static void on_handle_closed(uv_handle_t *h)
{
    struct ingest *ing = h->data;
    if (--ing->handles == 0) {
        fail_pending(ing, "shutting down");
        maybe_free(ing);
    }
}

void ingest_close(struct ingest *ing)
{
    if (!ing || ing->closing) return;
    ing->closing = true;
    uv_close((uv_handle_t *)&ing->check, on_handle_closed);
    uv_close((uv_handle_t *)&ing->idle, on_handle_closed);
    uv_close((uv_handle_t *)&ing->prune_timer, on_handle_closed);
    log_info("ingest", "event=closing pending=%zu in_flight=%zu", ing->npending, ing->ninflight);
}
