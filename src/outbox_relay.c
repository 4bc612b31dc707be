/* outbox_relay: LISTEN/NOTIFY + timer, claim, produce, record on ack (the lease:
 * relay_lease.c, the row map: relay_rows.c, retention and backlog gauges: relay_upkeep.c).
 *
 * Leadership is relay_lease.c's: only the holder of the lease claims, and its publication
 * records are fenced by the lease's epoch in the same statement (mark_sql).
 *
 * Every outbox row in hand sits in one map (relay_rows.h: its states, and why MARKED rows
 * wait for the claim in flight).
 *
 * Claims walk a cursor in (xid, id) order, reading only rows whose transaction is below the
 * horizon pg_snapshot_xmin(pg_current_snapshot()): every transaction below it has ended, so
 * no row can still appear below the cursor, however out of id order transactions commit.
 * The cursor is durable in the lease row (relay_lease.cursor_xid/cursor_id): every tick the
 * leader stores the key below the first row it holds unrecorded (fenced by the epoch), and a
 * new leader starts there. Publication is an insert-only record (outbox_publications: one
 * row per partition per mark); nothing in outbox is updated but attempts/last_error on a
 * failed try. See docs/ARCHITECTURE.md "The relay's cursor". */
#include "outbox_relay.h"

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <librdkafka/rdkafka.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "db_pool.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"
#include "pg_array.h"
#include "relay_int.h"
#include "relay_lease.h"
#include "relay_rows.h"
#include "relay_upkeep.h"
#include "metrics.h"

#define RELAY_RETENTION_EVERY_MS 60000

/* The horizon: a transaction below the snapshot's xmin has ended, so the rows read here
 * are all that will ever exist up to the last one returned (the index outbox_xid_idx).
 * Rows with a record are left out: after a rewind (a retry) or a takeover the cursor may
 * lie below rows already recorded, which must not be sent again and again (one GiST probe
 * per row; a new row's id lies in no record's range, so the probe ends at once). */
static const char *const claim_sql =
    "SELECT o.id, o.event_id, o.aggregate_id, o.payload::text, "
    DBP_RFC3339_UTC("o.created_at") ", "
    "extract(epoch FROM o.created_at)::float8, o.attempts, o.xid::text "
    "FROM outbox o WHERE (o.xid, o.id) > ($1::xid8, $2::bigint)"
    " AND o.xid < pg_snapshot_xmin(pg_current_snapshot())"
    " AND NOT EXISTS (SELECT 1 FROM outbox_publications p"
    "  WHERE int8range(p.first_id, p.last_id, '[]') @> o.id AND o.id = ANY (p.ids))"
    " ORDER BY o.xid, o.id LIMIT $3";

#define LEASE_FENCE                                                                        \
    "lease AS (SELECT 1 FROM relay_lease WHERE name = 'relay' AND holder = $4"             \
    " AND epoch = $5::bigint AND expires_at > now())"

/* One record per partition; $4 holder, $5 epoch: fenced by the lease (relay_lease.h).
 * Answers the rows recorded per record (none when the lease was lost). */
static const char *const mark_sql =
    "WITH " LEASE_FENCE " "
    "INSERT INTO outbox_publications (kafka_partition, ids, offsets, first_id, last_id, epoch) "
    "SELECT u.p, array_agg(u.id ORDER BY u.id), array_agg(u.off ORDER BY u.id), min(u.id),"
    " max(u.id), $5::bigint FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS u(id, p, off)"
    " WHERE EXISTS (SELECT 1 FROM lease) GROUP BY u.p RETURNING cardinality(ids)";

/* The durable cursor ($1 xid, $2 id): only forward, only by the lease's holder. */
static const char *const cursor_sql =
    "UPDATE relay_lease SET cursor_xid = $1::xid8, cursor_id = $2::bigint"
    " WHERE name = 'relay' AND holder = $3 AND epoch = $4::bigint AND expires_at > now()"
    " AND (cursor_xid, cursor_id) < ($1::xid8, $2::bigint)";

static const char *const fail_sql =
    "UPDATE outbox o SET attempts = o.attempts + 1, last_error = u.e "
    "FROM unnest($1::bigint[], $2::text[]) AS u(id, e) WHERE o.id = u.id";

/* A place in the claim order. */
/* --- small helpers ------------------------------------------------------------------- */

/* Why a query failed, quoted for a log value (the loop is single-threaded). */
static const char *db_error(const char *error, const PGresult *res) /* also any text */
{
    static char buf[320];
    log_quote(dbp_error_text(error, res), buf, sizeof buf);
    return buf;
}

static double now_epoch(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void set_kafka_up(struct relay *r, bool up, const char *why)
{
    if (up != r->kafka_up) {
        if (up)
            log_info("relay", "event=kafka_reachable");
        else
            log_warn("relay", "event=kafka_unreachable why=%s note=\"rows wait in the outbox\"",
                     why);
        metrics_gauge_set("ticketd_relay_kafka_up", NULL, up ? 1 : 0);
    }
    r->kafka_up = up;
    if (up) r->kafka_seen = true;
}

/* The lease changed hands (relay_lease calls the hooks only on a change). */
void relay_note_active(struct relay *r, bool active, const char *why)
{
    metrics_gauge_set("ticketd_relay_active", NULL, active ? 1 : 0);
    if (active) log_info("relay", "event=became_active why=%s", why);
    else log_warn("relay", "event=became_inactive why=%s", why);
}

static void maybe_claim(struct relay *r);
static bool lease_held(struct relay *r);
static void on_retry_timer(uv_timer_t *t);
static void on_retention_timer(uv_timer_t *t);
static void rewind_cursor(struct relay *r, struct relay_key to);

/* --- marking ------------------------------------------------------------------------- */

static void on_mark_done(void *ud, const PGresult *res, const char *error)
{
    struct relay *r = ud;
    size_t n = r->acks_sending;
    r->acks_sending = 0;

    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        /* Keep them: marked again on the next tick. Rows stay owned meanwhile. */
        log_warn("relay", "event=mark_failed rows=%zu err=%s", n,
                 db_error(error, res));
        if (r->closing) relay_close_check(r);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        struct row *row = relay_rows_find(&r->rows, r->acks[i].id);
        if (!row) continue;
        /* With no claim in flight, every later claim sees the mark: the row can go now. */
        if (!r->claim_inflight ||
            relay_grow((void **)&r->marked, &r->marked_cap, r->nmarked + 1, sizeof *r->marked) != 0) {
            relay_rows_remove(&r->rows, r->acks[i].id);
            continue;
        }
        row->state = ROW_MARKED;
        r->marked[r->nmarked++] = (struct marked){r->acks[i].id, r->claim_seq_inflight};
    }
    if (n) memmove(r->acks, r->acks + n, (r->nacks - n) * sizeof *r->acks);
    r->nacks -= n;
    long marked = 0;
    for (int i = 0; i < PQntuples(res); i++) marked += atol(PQgetvalue(res, i, 0));
    metrics_counter_add("ticketd_relay_marked_total", NULL, (double)marked);
    if ((size_t)marked < n)
        log_info("relay", "event=mark_skipped rows=%zu marked=%ld "
                 "note=\"the lease was lost\"", n, marked);
    log_debug("relay", "event=marked rows=%zu", n);
    relay_flush_marks(r);
    if (r->closing) relay_close_check(r);
    else maybe_claim(r);
}

void relay_flush_marks(struct relay *r)
{
    if (r->acks_sending || !r->nacks || r->teardown || !lease_held(r)) return;
    size_t n = r->nacks < RELAY_MARK_BATCH_MAX ? r->nacks : RELAY_MARK_BATCH_MAX;
    struct strbuf ids = STRBUF_INIT, parts = STRBUF_INIT, offs = STRBUF_INIT;
    pg_array_open(&ids);
    pg_array_open(&parts);
    pg_array_open(&offs);
    for (size_t i = 0; i < n; i++) {
        pg_array_int(&ids, r->acks[i].id);
        pg_array_int(&parts, r->acks[i].partition);
        pg_array_int(&offs, r->acks[i].offset);
    }
    if (pg_array_close(&ids) == 0 && pg_array_close(&parts) == 0 && pg_array_close(&offs) == 0) {
        char epoch[24];
        snprintf(epoch, sizeof epoch, "%" PRId64, r->lease.epoch);
        const char *params[5] = {ids.p, parts.p, offs.p, r->lease.holder, epoch};
        if (dbp_query(r->marker, mark_sql, 5, params, on_mark_done, r) == 0) r->acks_sending = n;
    }
    strbuf_free(&ids);
    strbuf_free(&parts);
    strbuf_free(&offs);
}

static void on_fail_done(void *ud, const PGresult *res, const char *error)
{
    struct relay *r = ud;
    size_t n = r->fails_sending;
    r->fails_sending = 0;
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        log_warn("relay", "event=record_failure_failed rows=%zu err=%s", n,
                 db_error(error, res));
        if (r->closing) relay_close_check(r);
        return;
    }
    if (n) memmove(r->fails, r->fails + n, (r->nfails - n) * sizeof *r->fails);
    r->nfails -= n;
    relay_flush_fails(r);
    if (r->closing) relay_close_check(r);
}

void relay_flush_fails(struct relay *r)
{
    if (r->fails_sending || !r->nfails || r->teardown) return;
    size_t n = r->nfails < RELAY_MARK_BATCH_MAX ? r->nfails : RELAY_MARK_BATCH_MAX;
    struct strbuf ids = STRBUF_INIT, errs = STRBUF_INIT;
    pg_array_open(&ids);
    pg_array_open(&errs);
    for (size_t i = 0; i < n; i++) {
        pg_array_int(&ids, r->fails[i].id);
        pg_array_text(&errs, r->fails[i].error);
    }
    if (pg_array_close(&ids) == 0 && pg_array_close(&errs) == 0) {
        const char *params[2] = {ids.p, errs.p};
        if (dbp_query(r->marker, fail_sql, 2, params, on_fail_done, r) == 0) r->fails_sending = n;
    }
    strbuf_free(&ids);
    strbuf_free(&errs);
}

/* A try that failed (delivery report or produce call): record it, retry after backoff. */
static void row_failed(struct relay *r, struct row *row, const char *error)
{
    int attempts = row->attempts + 1;
    uint64_t backoff = (uint64_t)r->cfg->relay_retry_backoff_ms;
    for (int i = 1; i < attempts && backoff < RELAY_BACKOFF_CAP_MS; i++) backoff *= 2;
    if (backoff > RELAY_BACKOFF_CAP_MS) backoff = RELAY_BACKOFF_CAP_MS;
    if (backoff < 1) backoff = 1;

    row->state = ROW_COOLDOWN;
    row->attempts = attempts;
    row->retry_at = uv_now(r->loop) + backoff;
    metrics_counter_add("ticketd_relay_failures_total", NULL, 1);
    if (relay_grow((void **)&r->fails, &r->fails_cap, r->nfails + 1, sizeof *r->fails) == 0) {
        struct failure *f = &r->fails[r->nfails++];
        f->id = row->id;
        snprintf(f->error, sizeof f->error, "%s", error);
    }
    /* The earliest retry drives the timer. */
    if (!uv_is_active((uv_handle_t *)&r->retry_timer) ||
        backoff < uv_timer_get_due_in(&r->retry_timer))
        uv_timer_start(&r->retry_timer, on_retry_timer, backoff, 0);
}

/* --- delivery reports ---------------------------------------------------------------- */

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    struct relay *r = opaque;
    if (relay_grow((void **)&r->drs, &r->drs_cap, r->ndrs + 1, sizeof *r->drs) != 0) {
        log_error("relay", "event=oom_delivery_report id=%" PRId64, (int64_t)(intptr_t)m->_private);
        return; /* the row stays INFLIGHT, unpublished: resent by a later relay */
    }
    r->drs[r->ndrs++] = (struct dr){(int64_t)(intptr_t)m->_private, m->err, m->partition,
                                    m->offset};
}

static void process_drs(struct relay *r)
{
    size_t ok = 0, failed = 0;
    rd_kafka_resp_err_t first_err = RD_KAFKA_RESP_ERR_NO_ERROR;
    int64_t first_failed = 0;
    double now = now_epoch();

    for (size_t i = 0; i < r->ndrs; i++) {
        struct dr *d = &r->drs[i];
        struct row *row = relay_rows_find(&r->rows, d->id);
        if (!row || row->state != ROW_INFLIGHT) continue;
        r->inflight--;
        /* An acknowledgement without a position (librdkafka reports offset -1001 when the
         * idempotent producer's retry meets DUPLICATE_SEQUENCE_NUMBER, or a broker answers
         * without an offset) proves nothing we could write back or the audit could check:
         * it counts as a failed try, and the row is re-sent (same ce_id) rather than marked. */
        bool positioned = d->partition >= 0 && d->offset >= 0;
        if (d->err == RD_KAFKA_RESP_ERR_NO_ERROR && positioned) {
            if (relay_grow((void **)&r->acks, &r->acks_cap, r->nacks + 1, sizeof *r->acks) != 0) {
                rewind_cursor(r, key_below(row->xid, d->id)); /* resent later, same ce_id */
                relay_rows_remove(&r->rows, d->id);
                continue;
            }
            r->acks[r->nacks++] = (struct ack){d->id, d->partition, d->offset};
            row->state = ROW_ACKED;
            metrics_observe("ticketd_relay_commit_to_ack_seconds", NULL,
                            now > row->created_at ? now - row->created_at : 0);
            ok++;
        } else {
            if (!failed) {
                first_err = d->err;
                first_failed = d->id;
            }
            failed++;
            row_failed(r, row, d->err ? rd_kafka_err2str(d->err)
                                      : "acknowledged without a partition and offset");
        }
    }
    r->ndrs = 0;
    if (ok) {
        metrics_counter_add("ticketd_relay_published_total", NULL, (double)ok);
        set_kafka_up(r, true, NULL);
    }
    if (failed)
        log_warn("relay", "event=delivery_failed rows=%zu first_id=%" PRId64 " err=\"%s\"",
                 failed, first_failed,
                 first_err ? rd_kafka_err2str(first_err) : "acknowledged without an offset");
    relay_flush_marks(r);
    relay_flush_fails(r);
}

/* Statistics (every second) tell whether any broker learned from metadata is up. */
static int on_stats(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    struct relay *r = opaque;
    bool up = kafka_stats_broker_up(json);
    set_kafka_up(r, up, "no_broker_up");
    return 0; /* librdkafka frees json */
}

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    struct relay *r = opaque;
    char quoted[256];
    log_quote(reason, quoted, sizeof quoted);
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char why[256];
        rd_kafka_resp_err_t orig = rd_kafka_fatal_error(rk, why, sizeof why);
        log_quote(why, quoted, sizeof quoted);
        log_error("relay", "event=producer_fatal err=%s reason=%s action=recreate",
                  rd_kafka_err2name(orig), quoted);
        r->fatal = true;
        return;
    }
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        set_kafka_up(r, false, "all_brokers_down");
        return;
    }
    /* Connection failures are already in librdkafka's own log line (kafka_log_cb). */
    if (err == RD_KAFKA_RESP_ERR__TRANSPORT || err == RD_KAFKA_RESP_ERR__RESOLVE)
        log_debug("relay", "event=kafka_error err=%s reason=%s", rd_kafka_err2name(err), quoted);
    else
        log_warn("relay", "event=kafka_error err=%s reason=%s", rd_kafka_err2name(err), quoted);
}

static int producer_create(struct relay *r, const char *brokers)
{
    char errstr[512];
    rd_kafka_conf_t *conf = kafka_conf_new(brokers, r->cfg->kafka_config, errstr, sizeof errstr);
    if (!conf) {
        log_error("relay", "event=kafka_config_invalid err=%s", db_error(errstr, NULL));
        return -EINVAL;
    }
    if (kafka_conf_idempotent_producer(conf, r->cfg->kafka_config, NULL, errstr, sizeof errstr) ||
        (!strstr(r->cfg->kafka_config ? r->cfg->kafka_config : "", "statistics.interval.ms") &&
         rd_kafka_conf_set(conf, "statistics.interval.ms", "1000", errstr, sizeof errstr))) {
        log_error("relay", "event=kafka_config_invalid err=%s", db_error(errstr, NULL));
        rd_kafka_conf_destroy(conf);
        return -EINVAL;
    }
    rd_kafka_conf_set_opaque(conf, r);
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_stats_cb(conf, on_stats);
    rd_kafka_conf_set_error_cb(conf, on_error);
    kafka_conf_log_to_ours(conf);
    r->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!r->rk) {
        rd_kafka_conf_destroy(conf);
        log_error("relay", "event=producer_create_failed err=%s", db_error(errstr, NULL));
        return -EINVAL;
    }
    r->rkt = rd_kafka_topic_new(r->rk, r->cfg->topic, NULL);
    return 0;
}

static void drain_kafka(void *ud);

static int producer_bridge(struct relay *r)
{
    r->mainq = rd_kafka_queue_get_main(r->rk);
    int rc = kafka_bridge_start(&r->bridge, r->loop, r->mainq, drain_kafka, r);
    if (rc != 0) {
        log_error("relay", "event=bridge_failed err=\"%s\"", uv_strerror(rc));
        rd_kafka_queue_destroy(r->mainq);
        r->mainq = NULL;
    }
    return rc;
}

static void destroy_rk_work(uv_work_t *w)
{
    rd_kafka_destroy((rd_kafka_t *)w->data); /* joins librdkafka's threads: off the loop */
}

/* The fatal-error path: once every in-flight message has reported back (librdkafka fails
 * them all after a fatal error), the producer is destroyed off the loop and a new one
 * made. */
static void producer_recreate_done(uv_work_t *w, int status)
{
    struct relay *r = RELAY_CONTAINER_OF(w, struct relay, destroy_work);
    (void)status;
    r->closing_parts--;
    if (r->closing) {
        relay_close_check(r);
        return;
    }
    if (producer_create(r, r->brokers) == 0 && producer_bridge(r) == 0) {
        r->fatal = false;
        log_info("relay", "event=producer_recreated");
        maybe_claim(r);
    } else {
        log_error("relay", "event=producer_recreate_failed action=retry_next_tick");
        r->fatal = false; /* lets on_tick create it again */
        if (r->rk && !r->bridge) {
            if (r->rkt) rd_kafka_topic_destroy(r->rkt);
            r->rkt = NULL;
            rd_kafka_destroy(r->rk); /* never connected anything yet: quick */
            r->rk = NULL;
        }
    }
}

void relay_producer_retire(struct relay *r, uv_after_work_cb after)
{
    if (r->bridge) kafka_bridge_close(r->bridge);
    r->bridge = NULL;
    if (r->mainq) rd_kafka_queue_destroy(r->mainq);
    r->mainq = NULL;
    if (r->rkt) rd_kafka_topic_destroy(r->rkt);
    r->rkt = NULL;
    r->destroy_work.data = r->rk;
    r->rk = NULL;
    r->closing_parts++;
    if (uv_queue_work(r->loop, &r->destroy_work, destroy_rk_work, after) != 0) {
        rd_kafka_destroy((rd_kafka_t *)r->destroy_work.data);
        r->closing_parts--;
    }
}

static void drain_kafka(void *ud)
{
    struct relay *r = ud;
    if (!r->rk) return;
    /* Serves delivery reports, statistics and errors; each call handles one batch. */
    while (rd_kafka_poll(r->rk, 0) > 0) {
    }
    process_drs(r);
    if (r->fatal && r->inflight == 0 && !r->closing && !r->teardown)
        relay_producer_retire(r, producer_recreate_done);
    else if (r->closing)
        relay_close_check(r);
    else
        maybe_claim(r);
}

/* --- claiming and producing ---------------------------------------------------------- */

/* Rows held in the map (produced or cooling down), MARKED ones aside. */
static int busy_rows(const struct relay *r)
{
    return (int)(r->rows.count > r->nmarked ? r->rows.count - r->nmarked : 0);
}

/* The claim claim_seq returned: MARKED rows it might have read can go. */
static void drop_marked_upto(struct relay *r, uint64_t claim_seq)
{
    size_t k = 0;
    while (k < r->nmarked && r->marked[k].claim_seq <= claim_seq) {
        struct row *row = relay_rows_find(&r->rows, r->marked[k].id);
        if (row && row->state == ROW_MARKED) relay_rows_remove(&r->rows, r->marked[k].id);
        k++;
    }
    if (!k) return;
    memmove(r->marked, r->marked + k, (r->nmarked - k) * sizeof *r->marked);
    r->nmarked -= k;
}

/* Returns 0 when produced, 1 when the local queue is full (try later), -1 when the
 * produce call itself failed (recorded as a failed try). */
static int produce_row(struct relay *r, const PGresult *res, int i, struct row *row)
{
    const char *event_id = PQgetvalue(res, i, 1);
    const char *key = PQgetvalue(res, i, 2);
    const char *payload = PQgetvalue(res, i, 3);
    const char *ce_time = PQgetvalue(res, i, 4);
    rd_kafka_headers_t *h = rd_kafka_headers_new(6);

    rd_kafka_header_add(h, CE_SPECVERSION, -1, "1.0", -1);
    rd_kafka_header_add(h, CE_ID, -1, event_id, -1);
    rd_kafka_header_add(h, CE_SOURCE, -1, CE_SOURCE_TICKETD, -1);
    rd_kafka_header_add(h, CE_TYPE, -1, CE_TYPE_TICKET_APPLIED, -1);
    rd_kafka_header_add(h, CE_TIME, -1, ce_time, -1);
    rd_kafka_header_add(h, CE_CONTENT_TYPE, -1, "application/json", -1);

    rd_kafka_resp_err_t err = rd_kafka_producev(
        r->rk, RD_KAFKA_V_TOPIC(r->cfg->topic),
        RD_KAFKA_V_KEY(key, (size_t)PQgetlength(res, i, 2)),
        RD_KAFKA_V_VALUE((void *)payload, (size_t)PQgetlength(res, i, 3)),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(h),
        RD_KAFKA_V_OPAQUE((void *)(intptr_t)row->id), RD_KAFKA_V_END);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return 0; /* h is owned by the message now */
    rd_kafka_headers_destroy(h);
    if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) return 1;
    row_failed(r, row, rd_kafka_err2str(err));
    r->last_produce_err = err;
    return -1;
}

static void on_claim(void *ud, const PGresult *res, const char *error)
{
    struct relay *r = ud;
    r->claim_inflight = false;
    if (r->claim_gen != r->session_gen || r->claim_epoch != r->lease.epoch || !lease_held(r) ||
        r->closing || r->fatal || !r->rk) {
        drop_marked_upto(r, r->claim_seq_inflight);
        if (r->closing) relay_close_check(r);
        return;
    }
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        drop_marked_upto(r, r->claim_seq_inflight);
        log_warn("relay", "event=claim_failed err=%s",
                 db_error(error, res));
        return; /* the tick retries */
    }
    int n = PQntuples(res), produced = 0, failed = 0;
    int64_t first_failed = 0;
    bool stopped = false;
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        struct relay_key key = {strtoull(PQgetvalue(res, i, 7), NULL, 10), id};
        if (relay_rows_find(&r->rows, id)) { /* in flight, acked or cooling down */
            r->cursor = key;
            continue;
        }
        if (busy_rows(r) >= r->cfg->relay_inflight_max) {
            stopped = true;
            break;
        }
        struct row *row = relay_rows_insert(&r->rows, id);
        if (!row) {
            stopped = true;
            break;
        }
        row->state = ROW_INFLIGHT;
        row->xid = key.xid;
        row->attempts = atoi(PQgetvalue(res, i, 6));
        row->created_at = strtod(PQgetvalue(res, i, 5), NULL);
        int rc = produce_row(r, res, i, row);
        if (rc == 1) {
            relay_rows_remove(&r->rows, id);
            stopped = true;
            break;
        }
        if (rc == 0) {
            r->inflight++;
            produced++;
        } else if (!failed++) {
            first_failed = id;
        }
        r->cursor = key;
    }
    if (failed)
        log_warn("relay", "event=produce_failed rows=%d first_id=%" PRId64 " err=\"%s\"", failed,
                 first_failed, rd_kafka_err2str(r->last_produce_err));
    if (produced)
        log_debug("relay", "event=produced rows=%d cursor=%" PRIu64 "/%" PRId64, produced,
                  r->cursor.xid, r->cursor.id);
    drop_marked_upto(r, r->claim_seq_inflight); /* after the skip test above used them */
    /* A full batch means more rows may wait; claim again unless capacity ran out (the
     * next drain of delivery reports claims then). */
    if (!stopped && (n >= r->cfg->relay_batch || r->claim_again)) {
        r->claim_again = false;
        maybe_claim(r);
    }
}

static void maybe_claim(struct relay *r)
{
    if (r->closing || r->teardown || r->fatal || !r->rk || !lease_held(r)) return;
    if (r->claim_inflight) {
        r->claim_again = true;
        return;
    }
    if (busy_rows(r) >= r->cfg->relay_inflight_max) return;
    if (key_cmp(r->rewind_to, r->cursor) < 0) r->cursor = r->rewind_to;
    r->rewind_to = KEY_MAX;
    char xid[24], after[24], limit[16];
    snprintf(xid, sizeof xid, "%" PRIu64, r->cursor.xid);
    snprintf(after, sizeof after, "%" PRId64, r->cursor.id);
    snprintf(limit, sizeof limit, "%d", r->cfg->relay_batch);
    const char *params[3] = {xid, after, limit};
    if (dbp_query(r->session, claim_sql, 3, params, on_claim, r) != 0) return;
    r->claim_inflight = true;
    r->claim_again = false;
    r->claim_gen = r->session_gen;
    r->claim_epoch = r->lease.epoch;
    r->claim_seq_inflight = ++r->claim_seq_sent;
}

static void rewind_cursor(struct relay *r, struct relay_key to)
{
    if (key_cmp(to, r->rewind_to) < 0) r->rewind_to = to;
}

/* Rows whose backoff is over leave the map, and the cursor goes back below them. */
static void on_retry_timer(uv_timer_t *t)
{
    struct relay *r = t->data;
    uint64_t now = uv_now(r->loop), next = UINT64_MAX;
    struct relay_key *due = NULL;
    size_t ndue = 0, cap = 0;
    for (size_t i = 0; i < r->rows.cap; i++) {
        struct row *row = &r->rows.slots[i];
        if (!row->id || row->state != ROW_COOLDOWN) continue;
        if (row->retry_at <= now && relay_grow((void **)&due, &cap, ndue + 1, sizeof *due) == 0)
            due[ndue++] = (struct relay_key){row->xid, row->id};
        else if (row->retry_at < next)
            next = row->retry_at > now ? row->retry_at : now + 1;
    }
    for (size_t i = 0; i < ndue; i++) {
        rewind_cursor(r, key_below(due[i].xid, due[i].id));
        relay_rows_remove(&r->rows, due[i].id);
    }
    free(due);
    if (next != UINT64_MAX && !r->teardown)
        uv_timer_start(&r->retry_timer, on_retry_timer, next - now, 0);
    if (ndue) log_info("relay", "event=retrying rows=%zu", ndue);
    maybe_claim(r);
}

/* --- the lease (relay_lease.c) --------------------------------------------------------- */

/* Forgets every row in hand: the next leader sends them again (same ce_id). Messages still
 * queued in the producer are purged; delivery reports of any others find no row. */
static void drop_rows(struct relay *r)
{
    if (r->rk) rd_kafka_purge(r->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_NON_BLOCKING);
    relay_rows_clear(&r->rows);
    r->inflight = 0;
    r->nmarked = 0;
    r->nacks = r->acks_sending; /* a mark in progress is fenced by the DB */
    r->nfails = r->fails_sending;
    r->cursor = (struct relay_key){0, 0};
    r->rewind_to = KEY_MAX;
    uv_timer_stop(&r->retry_timer);
}

static void on_lease_acquired(void *ud)
{
    struct relay *r = ud;
    /* Continue from the durable cursor the lease row carried (relay_lease.h). */
    r->cursor = r->stored = (struct relay_key){r->lease.cursor_xid, r->lease.cursor_id};
    r->rewind_to = KEY_MAX;
    relay_note_active(r, true, "lease_acquired");
    maybe_claim(r);
    on_retention_timer(&r->retention_timer); /* then every minute */
}

static void on_lease_lost(void *ud, const char *why)
{
    struct relay *r = ud;
    relay_note_active(r, false, why);
    drop_rows(r);
}

static void on_lease_released(void *ud)
{
    relay_close_check(ud);
}

static const struct relay_lease_hooks lease_hooks = {on_lease_acquired, on_lease_lost,
                                                     on_lease_released};

static bool lease_held(struct relay *r)
{
    return relay_lease_held(&r->lease);
}

static void on_lease_timer(uv_timer_t *t)
{
    struct relay *r = t->data;
    if (!r->teardown) relay_lease_tick(&r->lease, r->session);
}

/* --- the session: LISTEN ------------------------------------------------------------- */

static void on_listen(void *ud, const PGresult *res, const char *error)
{
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK)
        log_warn("relay", "event=listen_failed err=%s",
                 db_error(error, res));
}

static void on_session_connect(void *ud, struct dbp *pool)
{
    struct relay *r = ud;
    r->session = pool;
    r->session_gen++;
    relay_lease_session_changed(&r->lease);
    if (r->closing) return;
    if (dbp_query(pool, "LISTEN outbox", 0, NULL, on_listen, r) != 0)
        log_warn("relay", "event=listen_failed err=\"not queued\"");
    on_lease_timer(&r->lease_timer);
}

static void on_session_disconnect(void *ud, struct dbp *pool)
{
    struct relay *r = ud;
    r->session_gen++;
    relay_lease_session_changed(&r->lease); /* its answer, if any, is ignored */
}

static void on_notify(void *ud, const char *channel, const char *payload)
{
    struct relay *r = ud;
    if (strcmp(channel, "outbox") != 0) return;
    (void)payload; /* the lowest new id: the horizon makes a rewind needless */
    maybe_claim(r);
}

/* --- the durable cursor ------------------------------------------------------------- */

/* Below the first row not yet recorded: every row in hand not MARKED (its record may not
 * be committed), a pending rewind (rows due for a retry), and the claim cursor (rows
 * beyond it were never read). Every row below this key has a committed record. */
static struct relay_key safe_cursor(const struct relay *r)
{
    struct relay_key k = key_cmp(r->rewind_to, r->cursor) < 0 ? r->rewind_to : r->cursor;
    for (size_t i = 0; i < r->rows.cap; i++) {
        const struct row *row = &r->rows.slots[i];
        if (!row->id || row->state == ROW_MARKED) continue;
        struct relay_key b = key_below(row->xid, row->id);
        if (key_cmp(b, k) < 0) k = b;
    }
    return k;
}

static void on_cursor_stored(void *ud, const PGresult *res, const char *error)
{
    struct relay *r = ud;
    r->cursor_inflight = false;
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK)
        log_warn("relay", "event=cursor_store_failed err=%s note=\"a new leader re-sends more\"",
                 db_error(error, res));
    if (r->closing) relay_close_check(r);
}

/* Once a tick: a new leader re-sends only what lies above it (same ce_id). */
void relay_store_cursor(struct relay *r)
{
    if (r->cursor_inflight || r->teardown || !lease_held(r)) return;
    struct relay_key k = safe_cursor(r);
    if (key_cmp(k, r->stored) <= 0) return;
    char xid[24], id[24], epoch[24];
    snprintf(xid, sizeof xid, "%" PRIu64, k.xid);
    snprintf(id, sizeof id, "%" PRId64, k.id);
    snprintf(epoch, sizeof epoch, "%" PRId64, r->lease.epoch);
    const char *params[4] = {xid, id, r->lease.holder, epoch};
    if (dbp_query(r->marker, cursor_sql, 4, params, on_cursor_stored, r) != 0) return;
    r->cursor_inflight = true;
    r->stored = k;
}

/* --- periodic work ------------------------------------------------------------------- */

static void on_tick(uv_timer_t *t)
{
    struct relay *r = t->data;
    if (r->closing) return;
    if (!r->rk && !r->fatal) {
        /* a failed recreate: try again */
        if (producer_create(r, r->brokers) != 0 || producer_bridge(r) != 0) return;
    }
    relay_flush_marks(r);
    relay_flush_fails(r);
    if (!lease_held(r)) return;
    maybe_claim(r);
    relay_store_cursor(r);
    relay_upkeep_backlog(&r->upkeep, r->session);
}

static bool upkeep_may_run(void *ud)
{
    struct relay *r = ud;
    return !r->closing && r->lease.held;
}

static void on_retention_timer(uv_timer_t *t)
{
    struct relay *r = t->data;
    relay_upkeep_retention(&r->upkeep);
}

/* --- lifecycle ----------------------------------------------------------------------- */

void relay_free(struct relay *r)
{
    free(r->rows.slots);
    free(r->acks);
    free(r->fails);
    free(r->marked);
    free(r->drs);
    free(r->brokers);
    free(r);
}

int relay_start(struct relay **out, uv_loop_t *loop, const struct cfg *cfg,
                const char *brokers)
{
    struct relay *r = calloc(1, sizeof *r);
    int rc;
    if (!r) return -ENOMEM;
    r->loop = loop;
    r->cfg = cfg;
    r->rewind_to = KEY_MAX;
    relay_lease_init(&r->lease, cfg->relay_lease_ttl_ms, &lease_hooks, r);
    r->brokers = strdup(brokers ? brokers : "");
    if (!r->brokers) {
        free(r);
        return -ENOMEM;
    }

    metrics_describe("ticketd_relay_published_total", "counter",
                     "Outbox rows acknowledged by Kafka (marked published)");
    metrics_describe("ticketd_relay_failures_total", "counter",
                     "Failed deliveries or produce calls (row left unpublished, retried)");
    relay_upkeep_describe();
    metrics_counter_add("ticketd_relay_failures_total", NULL, 0);
    metrics_describe("ticketd_relay_commit_to_ack_seconds", "histogram",
                     "Outbox row commit to broker acknowledgement");
    metrics_describe("ticketd_relay_marked_total", "counter",
                     "Outbox rows this process marked published (fenced by its lease)");
    metrics_counter_add("ticketd_relay_marked_total", NULL, 0);
    metrics_describe("ticketd_relay_active", "gauge",
                     "1 while this process holds the relay lease (renewed within RELAY_LEASE_TTL)");
    metrics_describe("ticketd_relay_kafka_up", "gauge", "1 when the producer sees a broker up");
    metrics_gauge_set("ticketd_relay_kafka_up", NULL, 0);
    metrics_gauge_set("ticketd_relay_active", NULL, 0);

    rc = producer_create(r, brokers);
    if (rc != 0) goto fail;
    rc = producer_bridge(r);
    if (rc != 0) goto fail;

    struct dbp_opts so = {.conninfo = cfg->database_url, .size = 1, .name = "relay",
                          .reconnect_max_ms = 1000, .on_connect = on_session_connect,
                          .on_disconnect = on_session_disconnect, .on_notify = on_notify,
                          .ud = r};
    rc = dbp_create(&r->session, loop, &so);
    if (rc != 0) goto fail_bridge;
    struct dbp_opts mo = {.conninfo = cfg->database_url, .size = 1, .name = "relay-mark",
                          .reconnect_max_ms = 1000, .ud = r};
    rc = dbp_create(&r->marker, loop, &mo);
    if (rc != 0) goto fail_session;
    r->upkeep = (struct relay_upkeep){.db = r->marker, .retention_ms = cfg->outbox_retention_ms,
                                      .may_run = upkeep_may_run, .ud = r};

    uv_timer_init(loop, &r->tick_timer);
    uv_timer_init(loop, &r->retry_timer);
    uv_timer_init(loop, &r->retention_timer);
    uv_timer_init(loop, &r->close_timer);
    uv_timer_init(loop, &r->lease_timer);
    r->tick_timer.data = r->retry_timer.data = r->retention_timer.data = r->close_timer.data = r;
    r->lease_timer.data = r;
    uint64_t lease_every = relay_lease_poll_ms(&r->lease);
    uv_timer_start(&r->lease_timer, on_lease_timer, lease_every, lease_every);
    uint64_t interval = cfg->relay_interval_ms > 0 ? (uint64_t)cfg->relay_interval_ms : 1000;
    uv_timer_start(&r->tick_timer, on_tick, interval, interval);
    uv_timer_start(&r->retention_timer, on_retention_timer, RELAY_RETENTION_EVERY_MS,
                   RELAY_RETENTION_EVERY_MS);
    log_info("relay", "event=started topic=%s batch=%d inflight_max=%d interval_ms=%" PRIu64
             " lease_ttl_ms=%" PRIu64 " holder=%s", cfg->topic, cfg->relay_batch,
             cfg->relay_inflight_max, interval, r->lease.ttl_ms, r->lease.holder);
    *out = r;
    return 0;

fail_session:
    dbp_close(r->session, NULL, NULL);
fail_bridge:
    kafka_bridge_close(r->bridge);
    rd_kafka_queue_destroy(r->mainq);
fail:
    if (r->rkt) rd_kafka_topic_destroy(r->rkt);
    if (r->rk) rd_kafka_destroy(r->rk); /* start-up: blocking is allowed */
    relay_free(r);
    return rc < 0 ? rc : -1;
}

bool relay_kafka_ready(const struct relay *r)
{
    return r && r->kafka_seen;
}

bool relay_is_active(const struct relay *r)
{
    return r && r->lease.held;
}

