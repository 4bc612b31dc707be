/* consumer: the group consumer, per-partition order, retries, DLQ, offsets (see consumer.h). */
#include "consumer.h"

#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "db_pool.h"
#include "effects.h"
#include "http_client.h"
#include "kafka_common.h"
#include "log.h"
#include "metrics.h"

/* A logfmt-quoted copy of s in buf (free-form texts: remote replies, libpq errors). */
static const char *lq(const char *s, char *buf, size_t n)
{
    log_quote(s ? s : "", buf, n);
    return buf;
}

#define PART_QUEUE_PAUSE 500      /* fetched, unhandled messages per partition before pausing it */
#define COMMIT_INTERVAL_MS 200    /* finished offsets are committed at most this often */
#define POLL_INTERVAL_MS 1000     /* serve the consumer even when idle (max.poll.interval.ms) */
#define CLOSE_DRAIN_MAX_MS 10000  /* wait for runs in flight at shutdown, at most */
#define CLOSE_KAFKA_MAX_MS 10000  /* wait for the asynchronous consumer close, at most */
#define BACKOFF_MAX_MS 60000      /* cap of the exponential backoff */
#define CONSUMER_DB_POOL 4        /* PostgreSQL connections of the consumer */
#define DLQ_MESSAGE_MAX 1000      /* bytes of error message kept in the DLQ header and row */

enum pstate {
    P_IDLE,          /* nothing in hand */
    P_RUNNING,       /* effects run in flight */
    P_BACKOFF,       /* waiting for the next attempt (partition paused) */
    P_DLQ_PRODUCING, /* produced to the DLQ, waiting for the delivery report */
    P_DLQ_RECORDING, /* acknowledged; dead_letters insert in flight */
    P_DLQ_WAIT,      /* produce or insert failed; timer retries it (partition paused) */
};

struct qmsg {
    rd_kafka_message_t *m;
    struct qmsg *next;
};

struct cpart {
    struct consumer *c;
    int32_t partition;
    bool assigned;              /* false once revoked: a zombie until its callback arrives */
    struct cpart *next_zombie;
    struct qmsg *head, *tail;   /* fetched, not yet handled, in offset order */
    size_t qlen;
    rd_kafka_message_t *cur;    /* the event in hand */
    struct effects_event ev;
    bool parsed;
    int attempts;
    enum pstate state;
    bool paused;
    bool dlq_acked;             /* P_DLQ_WAIT: retry the insert (true) or the produce */
    uv_timer_t timer;           /* retry backoff, DLQ retries */
    int64_t last_seen;          /* offset of the last message queued */
    int64_t next_commit;        /* last finished offset + 1; -1 = none yet */
    int64_t commit_sent;        /* handed to rd_kafka_commit */
    int64_t commit_acked;       /* acknowledged by the coordinator */
    int32_t dlq_partition;
    int64_t dlq_offset;
    char err_class[32];
    char err_msg[DLQ_MESSAGE_MAX];
};

enum phase { PH_RUNNING, PH_DRAINING, PH_STOPPING_IO, PH_KAFKA_CLOSING, PH_DESTROYING, PH_DONE };

struct consumer {
    uv_loop_t *loop;
    const struct cfg *cfg;
    rd_kafka_t *rk;             /* group consumer */
    rd_kafka_t *dlq;            /* DLQ producer */
    rd_kafka_queue_t *cq, *dlq_q, *close_q;
    struct kafka_bridge *cbridge, *dlq_bridge, *close_bridge;
    struct dbp *db;
    struct hc *hc;
    struct effects *fx;
    struct cpart **parts;       /* by partition number; NULL = not assigned */
    int32_t nparts;
    struct cpart *zombies;
    uv_timer_t commit_timer, poll_timer, close_timer;
    bool commit_scheduled;
    unsigned open_handles;
    bool ready;
    enum phase phase;
    uint64_t rng;
    uv_work_t destroy_work;
    void (*close_done)(void *ud);
    void *close_ud;
};

/* The consumer the lag collector reads (metrics has no way to remove a collector). */
static struct consumer *lag_consumer;
static bool lag_collector_added;

static void pump(struct cpart *p);
static void attempt(struct cpart *p);
static void on_retry_timer(uv_timer_t *t);
static void dlq_send(struct cpart *p);
static void dlq_record(struct cpart *p);
static void close_progress(struct consumer *c);

static const char *const dlq_header_names[] = {
    "dlq_original_topic", "dlq_original_partition", "dlq_original_offset",
    "dlq_original_timestamp", "dlq_consumer_group", "dlq_attempts",
    "dlq_error_class", "dlq_error_message",
};

static const char dead_letter_sql[] =
    "INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition, src_offset,"
    " dlq_partition, dlq_offset, attempts, error_class, error_message)"
    " SELECT coalesce($1::uuid, md5($3 || '/' || $4 || '/' || $5)::uuid), $2::bigint, $3,"
    " $4::int, $5::bigint, $6::int, $7::bigint, $8::int, $9, $10"
    " WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE dlq_partition = $6::int"
    " AND dlq_offset = $7::bigint)";

/* ---- small helpers ---- */

static uint64_t next_random(struct consumer *c)
{
    /* xorshift64: jitter only, not security */
    uint64_t x = c->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    c->rng = x;
    return x;
}

static uint64_t backoff_ms(struct consumer *c, int attempts)
{
    uint64_t base = (uint64_t)c->cfg->retry_backoff_ms;
    if (!c->cfg->retry_exponential) return base;
    for (int i = 1; i < attempts && base < BACKOFF_MAX_MS; i++) base *= 2;
    if (base > BACKOFF_MAX_MS) base = BACKOFF_MAX_MS;
    /* +-25 % jitter so partitions failing together do not retry in lockstep */
    uint64_t span = base / 2;
    return span ? base - base / 4 + next_random(c) % (span + 1) : base;
}

static void ascii_only(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) *s = '?';
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool get_header(const rd_kafka_message_t *m, const char *name, const char **val,
                       size_t *len)
{
    rd_kafka_headers_t *h = NULL;
    const void *v = NULL;
    *val = NULL;
    *len = 0;
    if (rd_kafka_message_headers(m, &h) != RD_KAFKA_RESP_ERR_NO_ERROR || !h) return false;
    if (rd_kafka_header_get_last(h, name, &v, len) != RD_KAFKA_RESP_ERR_NO_ERROR || !v)
        return false;
    *val = v;
    return true;
}

static rd_kafka_topic_partition_list_t *one_partition(struct consumer *c, int32_t partition,
                                                      int64_t offset)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, c->cfg->topic, partition)->offset = offset;
    return l;
}

static void set_paused(struct cpart *p, bool want)
{
    struct consumer *c = p->c;
    if (want == p->paused) return;
    rd_kafka_topic_partition_list_t *l = one_partition(c, p->partition, RD_KAFKA_OFFSET_INVALID);
    rd_kafka_resp_err_t err =
        want ? rd_kafka_pause_partitions(c->rk, l) : rd_kafka_resume_partitions(c->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (err) {
        log_warn("consumer", "event=%s_failed partition=%" PRId32 " err=\"%s\"",
                 want ? "pause" : "resume", p->partition, rd_kafka_err2str(err));
        return;
    }
    p->paused = want;
}

/* Paused while waiting to retry (no point fetching more) or while its FIFO is long. */
static void update_pause(struct cpart *p)
{
    bool want = p->assigned && (p->state == P_BACKOFF || p->state == P_DLQ_WAIT ||
                                p->qlen >= PART_QUEUE_PAUSE);
    set_paused(p, want);
}

/* ---- partitions ---- */

static void part_on_timer_close(uv_handle_t *h)
{
    struct cpart *p = h->data;
    struct consumer *c = p->c;
    free(p);
    c->open_handles--;
    close_progress(c);
}

static void part_drop_messages(struct cpart *p)
{
    while (p->head) {
        struct qmsg *q = p->head;
        p->head = q->next;
        rd_kafka_message_destroy(q->m);
        free(q);
    }
    p->tail = NULL;
    p->qlen = 0;
    if (p->cur) {
        rd_kafka_message_destroy(p->cur);
        p->cur = NULL;
    }
    p->parsed = false;
}

static void part_free(struct cpart *p)
{
    part_drop_messages(p);
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, part_on_timer_close);
}

static struct cpart *part_get(struct consumer *c, int32_t partition)
{
    if (partition < 0 || partition >= c->nparts) return NULL;
    return c->parts[partition];
}

static struct cpart *part_assign(struct consumer *c, int32_t partition)
{
    if (partition < 0) return NULL;
    if (partition >= c->nparts) {
        int32_t n = partition + 1;
        struct cpart **np = realloc(c->parts, sizeof *np * (size_t)n);
        if (!np) return NULL;
        for (int32_t i = c->nparts; i < n; i++) np[i] = NULL;
        c->parts = np;
        c->nparts = n;
    }
    if (c->parts[partition]) return c->parts[partition];
    struct cpart *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->c = c;
    p->partition = partition;
    p->assigned = true;
    p->last_seen = -1;
    p->next_commit = p->commit_sent = p->commit_acked = -1;
    uv_timer_init(c->loop, &p->timer);
    p->timer.data = p;
    c->open_handles++;
    c->parts[partition] = p;
    return p;
}

static void zombie_remove(struct cpart *p)
{
    struct consumer *c = p->c;
    for (struct cpart **pp = &c->zombies; *pp; pp = &(*pp)->next_zombie) {
        if (*pp == p) {
            *pp = p->next_zombie;
            return;
        }
    }
}

/* A revoked partition's callback arrived: nothing is committed for it; free it. */
static void zombie_done(struct cpart *p)
{
    zombie_remove(p);
    part_free(p);
    close_progress(p->c);
}

static void part_revoke(struct consumer *c, int32_t partition)
{
    struct cpart *p = part_get(c, partition);
    if (!p) return;
    c->parts[partition] = NULL;
    set_paused(p, false); /* pause flags could outlive the assignment */
    p->assigned = false;
    uv_timer_stop(&p->timer);
    char labels[48];
    snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", partition);
    metrics_gauge_set("ticketd_consumer_lag", labels, 0);
    if (p->state == P_RUNNING || p->state == P_DLQ_PRODUCING || p->state == P_DLQ_RECORDING) {
        /* keep the message its callback refers to; drop the rest */
        rd_kafka_message_t *cur = p->cur;
        p->cur = NULL;
        part_drop_messages(p);
        p->cur = cur;
        p->next_zombie = c->zombies;
        c->zombies = p;
        log_info("consumer", "event=revoked_in_flight partition=%" PRId32, partition);
        return;
    }
    part_free(p);
}

/* ---- commits ---- */

static void commit_now(struct consumer *c)
{
    if (!c->rk || c->phase >= PH_DESTROYING) return;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(8);
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (!p || !p->assigned || p->next_commit <= p->commit_sent) continue;
        rd_kafka_topic_partition_list_add(l, c->cfg->topic, p->partition)->offset = p->next_commit;
        p->commit_sent = p->next_commit;
    }
    if (l->cnt > 0) {
        rd_kafka_resp_err_t err = rd_kafka_commit(c->rk, l, 1 /* async */);
        if (err) {
            log_warn("consumer", "event=commit_failed err=\"%s\"", rd_kafka_err2str(err));
            for (int i = 0; i < l->cnt; i++) {
                struct cpart *p = part_get(c, l->elems[i].partition);
                if (p) p->commit_sent = p->commit_acked;
            }
        }
    }
    rd_kafka_topic_partition_list_destroy(l);
}

static void on_commit_timer(uv_timer_t *t)
{
    struct consumer *c = t->data;
    c->commit_scheduled = false;
    commit_now(c);
}

static void schedule_commit(struct consumer *c)
{
    if (c->commit_scheduled || c->phase >= PH_KAFKA_CLOSING) return;
    c->commit_scheduled = true;
    uv_timer_start(&c->commit_timer, on_commit_timer, COMMIT_INTERVAL_MS, 0);
}

static void commit_result(struct consumer *c, rd_kafka_resp_err_t err,
                          const rd_kafka_topic_partition_list_t *offsets)
{
    if (err == RD_KAFKA_RESP_ERR__NO_OFFSET) return; /* nothing to commit */
    for (int i = 0; offsets && i < offsets->cnt; i++) {
        const rd_kafka_topic_partition_t *e = &offsets->elems[i];
        struct cpart *p = part_get(c, e->partition);
        rd_kafka_resp_err_t perr = err ? err : e->err;
        if (perr) {
            log_warn("consumer", "event=commit_failed partition=%" PRId32 " offset=%" PRId64
                     " err=\"%s\"", e->partition, e->offset, rd_kafka_err2str(perr));
            if (p && p->commit_sent == e->offset) {
                p->commit_sent = p->commit_acked;
                schedule_commit(c);
            }
        } else if (p && e->offset > p->commit_acked) {
            p->commit_acked = e->offset;
        }
    }
}

static void offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                             rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    commit_result(opaque, err, offsets);
}

/* ---- one event ---- */

static void finish_event(struct cpart *p, bool processed)
{
    struct consumer *c = p->c;
    rd_kafka_message_t *m = p->cur;

    p->next_commit = m->offset + 1;
    if (processed) {
        metrics_counter_add("ticketd_consumer_processed_total", NULL, 1);
        rd_kafka_timestamp_type_t tstype;
        int64_t ts = rd_kafka_message_timestamp(m, &tstype);
        if (ts > 0) {
            int64_t d = wall_ms() - ts;
            metrics_observe("ticketd_consumer_publish_to_processed_seconds", NULL,
                            d > 0 ? (double)d / 1000.0 : 0.0);
        }
    }
    rd_kafka_message_destroy(m);
    p->cur = NULL;
    p->parsed = false;
    p->state = P_IDLE;
    schedule_commit(c);
    update_pause(p);
    if (c->phase != PH_RUNNING) close_progress(c);
    else pump(p);
}

static void on_run_done(void *ud, const struct effects_outcome *o)
{
    char qb[600];
    struct cpart *p = ud;
    struct consumer *c = p->c;

    if (!p->assigned) {
        zombie_done(p);
        return;
    }
    if (o->ok) {
        log_debug("consumer", "event=processed partition=%" PRId32 " offset=%" PRId64
                  " event_id=%s points_granted=%d", p->partition, p->cur->offset,
                  p->ev.event_id, o->points_granted);
        finish_event(p, true);
        return;
    }
    snprintf(p->err_class, sizeof p->err_class, "%s", o->error_class ? o->error_class : "unknown");
    snprintf(p->err_msg, sizeof p->err_msg, "%s", o->error_message ? o->error_message : "");
    ascii_only(p->err_msg);
    if (c->phase != PH_RUNNING) {
        /* Shutting down: the event stays unfinished; its offset is not committed, so the
         * next owner gets it again. */
        rd_kafka_message_destroy(p->cur);
        p->cur = NULL;
        p->parsed = false;
        p->state = P_IDLE;
        close_progress(c);
        return;
    }
    if (p->attempts < c->cfg->retry_max_attempts) {
        uint64_t delay = backoff_ms(c, p->attempts);
        metrics_counter_add("ticketd_consumer_retries_total", NULL, 1);
        log_warn("consumer", "event=retry partition=%" PRId32 " offset=%" PRId64
                 " event_id=%s attempt=%d of=%d next_in_ms=%" PRIu64 " class=%s err=%s",
                 p->partition, p->cur->offset, p->ev.event_id, p->attempts,
                 c->cfg->retry_max_attempts, delay, p->err_class, lq(p->err_msg, qb, sizeof qb));
        p->state = P_BACKOFF;
        update_pause(p);
        uv_timer_start(&p->timer, on_retry_timer, delay, 0);
        return;
    }
    log_error("consumer", "event=attempts_exhausted partition=%" PRId32 " offset=%" PRId64
              " event_id=%s attempts=%d class=%s err=%s action=dead_letter",
              p->partition, p->cur->offset, p->ev.event_id, p->attempts, p->err_class,
              lq(p->err_msg, qb, sizeof qb));
    dlq_send(p);
}

/* Starts (or retries) the event in hand. */
static void attempt(struct cpart *p)
{
    char qb[600];
    struct consumer *c = p->c;
    rd_kafka_message_t *m = p->cur;

    if (!p->assigned || c->phase != PH_RUNNING || !m) return;
    p->state = P_RUNNING;
    update_pause(p);
    if (!p->parsed) {
        const char *id, *tm;
        size_t id_len, tm_len;
        char why[256];
        bool has_id = get_header(m, CE_ID, &id, &id_len);
        get_header(m, CE_TIME, &tm, &tm_len);
        if (effects_parse(has_id ? id : NULL, id_len, tm, tm_len, m->payload, m->len, &p->ev,
                          why, sizeof why) != 0) {
            p->attempts = 1;
            snprintf(p->err_class, sizeof p->err_class, "unparseable");
            snprintf(p->err_msg, sizeof p->err_msg, "%s", why);
            ascii_only(p->err_msg);
            log_error("consumer", "event=poison_message partition=%" PRId32 " offset=%" PRId64
                      " err=%s action=dead_letter", p->partition, m->offset,
                      lq(p->err_msg, qb, sizeof qb));
            dlq_send(p);
            return;
        }
        p->ev.topic = c->cfg->topic;
        p->ev.partition = p->partition;
        p->ev.offset = m->offset;
        p->parsed = true;
    }
    p->attempts++;
    int rc = effects_run(c->fx, &p->ev, on_run_done, p);
    if (rc != 0) {
        /* could not even start (database down, queue full): a failed attempt like any other */
        struct effects_outcome o = {
            .ok = false,
            .error_class = "db",
            .error_message = rc == -ENOTCONN ? "database unavailable" : strerror(-rc),
        };
        on_run_done(p, &o);
    }
}

static void on_retry_timer(uv_timer_t *t)
{
    struct cpart *p = t->data;
    if (p->state == P_BACKOFF) attempt(p);
    else if (p->state == P_DLQ_WAIT) {
        if (p->dlq_acked) dlq_record(p);
        else dlq_send(p);
    }
}

static void pump(struct cpart *p)
{
    struct consumer *c = p->c;
    if (p->state != P_IDLE || !p->assigned || c->phase != PH_RUNNING || !p->head) return;
    struct qmsg *q = p->head;
    p->head = q->next;
    if (!p->head) p->tail = NULL;
    p->qlen--;
    p->cur = q->m;
    free(q);
    p->attempts = 0;
    p->parsed = false;
    p->dlq_acked = false;
    attempt(p);
}

/* ---- dead letters ---- */

static void dlq_wait(struct cpart *p)
{
    p->state = P_DLQ_WAIT;
    update_pause(p);
    uv_timer_start(&p->timer, on_retry_timer, backoff_ms(p->c, 1), 0);
}

static void dlq_send(struct cpart *p)
{
    struct consumer *c = p->c;
    rd_kafka_message_t *m = p->cur;
    rd_kafka_headers_t *orig = NULL;
    char num[4][32];

    if (!p->assigned) return;
    if (c->phase != PH_RUNNING) {
        /* shutting down: left unfinished, re-delivered to the next owner */
        rd_kafka_message_destroy(p->cur);
        p->cur = NULL;
        p->parsed = false;
        p->state = P_IDLE;
        close_progress(c);
        return;
    }
    p->state = P_DLQ_PRODUCING;
    p->dlq_acked = false;
    update_pause(p);

    rd_kafka_headers_t *h =
        rd_kafka_message_headers(m, &orig) == RD_KAFKA_RESP_ERR_NO_ERROR && orig
            ? rd_kafka_headers_copy(orig)
            : rd_kafka_headers_new(8);
    for (size_t i = 0; i < sizeof dlq_header_names / sizeof *dlq_header_names; i++)
        rd_kafka_header_remove(h, dlq_header_names[i]); /* a replayed event failing again */
    rd_kafka_timestamp_type_t tstype;
    snprintf(num[0], sizeof num[0], "%" PRId32, m->partition);
    snprintf(num[1], sizeof num[1], "%" PRId64, m->offset);
    snprintf(num[2], sizeof num[2], "%" PRId64, rd_kafka_message_timestamp(m, &tstype));
    snprintf(num[3], sizeof num[3], "%d", p->attempts);
    rd_kafka_header_add(h, "dlq_original_topic", -1, c->cfg->topic, -1);
    rd_kafka_header_add(h, "dlq_original_partition", -1, num[0], -1);
    rd_kafka_header_add(h, "dlq_original_offset", -1, num[1], -1);
    rd_kafka_header_add(h, "dlq_original_timestamp", -1, num[2], -1);
    rd_kafka_header_add(h, "dlq_consumer_group", -1, c->cfg->consumer_group, -1);
    rd_kafka_header_add(h, "dlq_attempts", -1, num[3], -1);
    rd_kafka_header_add(h, "dlq_error_class", -1, p->err_class, -1);
    rd_kafka_header_add(h, "dlq_error_message", -1, p->err_msg, -1);

    rd_kafka_resp_err_t err = rd_kafka_producev(
        c->dlq, RD_KAFKA_V_TOPIC(c->cfg->dlq_topic), RD_KAFKA_V_KEY(m->key, m->key_len),
        RD_KAFKA_V_VALUE(m->payload, m->len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_OPAQUE(p), RD_KAFKA_V_END);
    if (err) {
        rd_kafka_headers_destroy(h); /* still ours when producev fails */
        log_error("consumer", "event=dlq_produce_failed partition=%" PRId32 " offset=%" PRId64
                  " err=\"%s\" action=retry", p->partition, m->offset, rd_kafka_err2str(err));
        dlq_wait(p);
    }
}

static void on_recorded(void *ud, const PGresult *res, const char *error)
{
    char qb[600];
    struct cpart *p = ud;
    struct consumer *c = p->c;
    bool ok = res && PQresultStatus(res) == PGRES_COMMAND_OK;

    if (!p->assigned) {
        zombie_done(p);
        return;
    }
    if (!ok) {
        log_error("consumer", "event=dead_letter_record_failed partition=%" PRId32
                  " offset=%" PRId64 " err=%s action=%s", p->partition, p->cur->offset,
                  lq(error ? error : PQresultErrorMessage(res), qb, sizeof qb),
                  c->phase == PH_RUNNING ? "retry" : "redeliver_later");
        if (c->phase != PH_RUNNING) {
            rd_kafka_message_destroy(p->cur);
            p->cur = NULL;
            p->state = P_IDLE;
            close_progress(c);
            return;
        }
        dlq_wait(p);
        return;
    }
    log_warn("consumer", "event=dead_lettered partition=%" PRId32 " offset=%" PRId64
             " event_id=%s dlq_partition=%" PRId32 " dlq_offset=%" PRId64 " class=%s",
             p->partition, p->cur->offset, p->parsed ? p->ev.event_id : "-", p->dlq_partition,
             p->dlq_offset, p->err_class);
    finish_event(p, false);
}

static void dlq_record(struct cpart *p)
{
    struct consumer *c = p->c;
    rd_kafka_message_t *m = p->cur;
    char app[24] = "", src_part[16], src_off[24], dlq_part[16], dlq_off[24], attempts[16];
    char idbuf[UUID_STR_LEN + 1];
    const char *event_id = p->parsed ? p->ev.event_id : NULL;
    const char *app_id = NULL;

    if (!p->parsed) {
        const char *id;
        size_t len;
        if (get_header(m, CE_ID, &id, &len) && effects_is_uuid(id, len)) {
            memcpy(idbuf, id, len);
            idbuf[len] = '\0';
            event_id = idbuf;
        }
        /* the key is the application id in decimal, when it is one */
        if (m->key && m->key_len > 0 && m->key_len < 19) {
            size_t i = 0;
            for (; i < m->key_len && ((const char *)m->key)[i] >= '0' &&
                   ((const char *)m->key)[i] <= '9'; i++)
                app[i] = ((const char *)m->key)[i];
            app[i] = '\0';
            if (i == m->key_len) app_id = app;
        }
    } else {
        snprintf(app, sizeof app, "%" PRId64, p->ev.application_id);
        app_id = app;
    }
    snprintf(src_part, sizeof src_part, "%" PRId32, p->partition);
    snprintf(src_off, sizeof src_off, "%" PRId64, m->offset);
    snprintf(dlq_part, sizeof dlq_part, "%" PRId32, p->dlq_partition);
    snprintf(dlq_off, sizeof dlq_off, "%" PRId64, p->dlq_offset);
    snprintf(attempts, sizeof attempts, "%d", p->attempts);
    const char *params[10] = {event_id, app_id, c->cfg->topic, src_part, src_off, dlq_part,
                              dlq_off, attempts, p->err_class, p->err_msg};
    p->state = P_DLQ_RECORDING;
    update_pause(p);
    if (dbp_query(c->db, dead_letter_sql, 10, params, on_recorded, p) != 0) {
        log_error("consumer", "event=dead_letter_record_failed partition=%" PRId32
                  " offset=%" PRId64 " err=\"database unavailable\" action=retry", p->partition,
                  m->offset);
        if (!p->assigned) {
            zombie_done(p);
            return;
        }
        dlq_wait(p);
    }
}

static void dlq_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    struct consumer *c = opaque;
    struct cpart *p = m->_private;

    if (!p || c->phase >= PH_KAFKA_CLOSING) return;
    if (m->err) {
        log_error("consumer", "event=dlq_delivery_failed partition=%" PRId32 " offset=%" PRId64
                  " err=\"%s\" action=retry", p->partition, p->cur ? p->cur->offset : -1,
                  rd_kafka_err2str(m->err));
        if (!p->assigned) {
            zombie_done(p);
            return;
        }
        if (c->phase != PH_RUNNING) {
            rd_kafka_message_destroy(p->cur);
            p->cur = NULL;
            p->state = P_IDLE;
            close_progress(c);
            return;
        }
        dlq_wait(p);
        return;
    }
    metrics_counter_add("ticketd_dlq_produced_total", NULL, 1);
    p->dlq_acked = true;
    p->dlq_partition = m->partition;
    p->dlq_offset = m->offset;
    dlq_record(p); /* a zombie records too: the message is in the DLQ either way */
}

static void on_dlq_ready(void *ud)
{
    struct consumer *c = ud;
    while (c->dlq && rd_kafka_poll(c->dlq, 0) > 0) {
    }
}

/* ---- consumer events ---- */

static void on_offset_reset(struct consumer *c, rd_kafka_message_t *m)
{
    char qb[600];
    const char *why = rd_kafka_message_errstr(m);
    int32_t partition = m->partition;
    bool first_start = strstr(why, rd_kafka_err2str(RD_KAFKA_RESP_ERR__NO_OFFSET)) != NULL;

    if (first_start) {
        log_info("consumer", "event=no_committed_offset partition=%" PRId32
                 " action=start_at_log_start", partition);
    } else {
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", partition);
        metrics_counter_add("ticketd_consumer_offset_out_of_range_total", labels, 1);
        log_error("consumer", "event=offset_out_of_range topic=%s partition=%" PRId32
                  " offset=%" PRId64 " err=%s action=seek_to_log_start"
                  " note=\"events below the log start were deleted before being handled;"
                  " run ticketd audit\"", c->cfg->topic, partition, m->offset, lq(why, qb, sizeof qb));
    }
    struct cpart *p = part_get(c, partition);
    if (p) p->last_seen = -1;
    rd_kafka_topic_partition_list_t *l = one_partition(c, partition, RD_KAFKA_OFFSET_BEGINNING);
    rd_kafka_error_t *err = rd_kafka_seek_partitions(c->rk, l, 0 /* async */);
    rd_kafka_topic_partition_list_destroy(l);
    if (err) {
        log_error("consumer", "event=seek_failed partition=%" PRId32 " err=\"%s\"", partition,
                  rd_kafka_error_string(err));
        rd_kafka_error_destroy(err);
    }
}

static void on_message(struct consumer *c, rd_kafka_message_t *m)
{
    char qb[600];
    if (m->err) {
        if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET) on_offset_reset(c, m);
        else if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
            log_warn("consumer", "event=consumer_error err=\"%s\" detail=%s",
                     rd_kafka_err2str(m->err), lq(rd_kafka_message_errstr(m), qb, sizeof qb));
        rd_kafka_message_destroy(m);
        return;
    }
    struct cpart *p = part_get(c, m->partition);
    if (!p || !p->assigned || c->phase != PH_RUNNING ||
        strcmp(rd_kafka_topic_name(m->rkt), c->cfg->topic) != 0 || m->offset <= p->last_seen) {
        rd_kafka_message_destroy(m); /* not ours (any more), or already queued */
        return;
    }
    struct qmsg *q = malloc(sizeof *q);
    if (!q) {
        /* Cannot hold it: rewind the partition to it so it is fetched again. */
        rd_kafka_topic_partition_list_t *l = one_partition(c, m->partition, m->offset);
        rd_kafka_error_t *err = rd_kafka_seek_partitions(c->rk, l, 0);
        if (err) rd_kafka_error_destroy(err);
        rd_kafka_topic_partition_list_destroy(l);
        rd_kafka_message_destroy(m);
        return;
    }
    q->m = m;
    q->next = NULL;
    if (p->tail) p->tail->next = q;
    else p->head = q;
    p->tail = q;
    p->qlen++;
    p->last_seen = m->offset;
    update_pause(p);
    pump(p);
}

static void rebalance(struct consumer *c, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *partitions)
{
    bool coop = strcmp(rd_kafka_rebalance_protocol(c->rk), "COOPERATIVE") == 0;
    char list[256] = "";
    size_t used = 0;
    for (int i = 0; partitions && i < partitions->cnt && used + 16 < sizeof list; i++)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%" PRId32, i ? "," : "",
                                 partitions->elems[i].partition);

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        for (int i = 0; i < partitions->cnt; i++)
            if (strcmp(partitions->elems[i].topic, c->cfg->topic) == 0)
                part_assign(c, partitions->elems[i].partition);
        if (coop) {
            rd_kafka_error_t *e = rd_kafka_incremental_assign(c->rk, partitions);
            if (e) {
                log_error("consumer", "event=assign_failed err=\"%s\"", rd_kafka_error_string(e));
                rd_kafka_error_destroy(e);
            }
        } else {
            rd_kafka_resp_err_t e = rd_kafka_assign(c->rk, partitions);
            if (e) log_error("consumer", "event=assign_failed err=\"%s\"", rd_kafka_err2str(e));
        }
        c->ready = true;
        log_info("consumer", "event=assigned group=%s partitions=%s", c->cfg->consumer_group,
                 list);
        return;
    }
    bool lost = rd_kafka_assignment_lost(c->rk);
    if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS && !lost) commit_now(c);
    for (int i = 0; partitions && i < partitions->cnt; i++)
        if (strcmp(partitions->elems[i].topic, c->cfg->topic) == 0)
            part_revoke(c, partitions->elems[i].partition);
    if (coop) {
        rd_kafka_error_t *e = rd_kafka_incremental_unassign(c->rk, partitions);
        if (e) rd_kafka_error_destroy(e);
    } else {
        rd_kafka_assign(c->rk, NULL);
    }
    log_info("consumer", "event=%s partitions=%s", lost ? "assignment_lost" : "revoked", list);
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *partitions, void *opaque)
{
    rebalance(opaque, err, partitions);
}

static void drain_consumer(struct consumer *c)
{
    rd_kafka_message_t *m;
    while (c->rk && c->phase < PH_STOPPING_IO && (m = rd_kafka_consumer_poll(c->rk, 0)))
        on_message(c, m);
}

static void on_consumer_ready(void *ud)
{
    drain_consumer(ud);
}

static void on_poll_timer(uv_timer_t *t)
{
    drain_consumer(t->data);
}

static void lag_collect(void *ud)
{
    struct consumer *c = lag_consumer;
    if (!c || c->phase != PH_RUNNING) return;
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (!p) continue;
        int64_t lo, hi, pos;
        if (rd_kafka_get_watermark_offsets(c->rk, c->cfg->topic, p->partition, &lo, &hi) != 0 ||
            hi < 0)
            continue;
        if (p->cur) pos = p->cur->offset;
        else if (p->head) pos = p->head->m->offset;
        else if (p->next_commit >= 0) pos = p->next_commit;
        else if (p->commit_acked >= 0) pos = p->commit_acked;
        else continue;
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", p->partition);
        metrics_gauge_set("ticketd_consumer_lag", labels, (double)(hi > pos ? hi - pos : 0));
    }
}

/* rdkafka's own log lines. With log.queue they are served by our polls, on the loop.
 * An offset reset caused by an error (out of range, log truncation) is logged by rdkafka
 * at warning level with facility OFFSET ("<topic> [<partition>]: offset reset (at offset
 * ..."); resets for a missing committed offset (a new group) only at debug level. */
static void on_rdkafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    int lvl = level <= 3 ? LOG_ERROR : level == 4 ? LOG_WARN : level <= 6 ? LOG_INFO : LOG_DEBUG;
    char quoted[512];
    log_quote(buf, quoted, sizeof quoted);
    struct consumer *c = rd_kafka_opaque(rk);
    if (c && rk == c->rk && level <= 4 && strcmp(fac, "OFFSET") == 0 &&
        strstr(buf, "offset reset")) {
        const char *br = strstr(buf, " [");
        long partition = br ? strtol(br + 2, NULL, 10) : -1;
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%ld\"", partition);
        metrics_counter_add("ticketd_consumer_offset_out_of_range_total", labels, 1);
        log_error("consumer", "event=offset_out_of_range partition=%ld detail=%s"
                  " action=continue_at_log_start note=\"events below the log start were"
                  " deleted before being handled; run ticketd audit\"", partition, quoted);
        return;
    }
    log_at(lvl, "rdkafka", "event=log fac=%s msg=%s", fac, quoted);
}

/* ---- start ---- */

static rd_kafka_conf_t *conf_for(const struct cfg *cfg, const char *brokers,
                                 const char *const *kv, size_t n)
{
    char err[512];
    rd_kafka_conf_t *conf = kafka_conf_new(brokers, cfg->kafka_config, err, sizeof err);
    if (!conf) {
        log_error("consumer", "event=config_error err=\"%s\"", err);
        return NULL;
    }
    for (size_t i = 0; i + 1 < n; i += 2) {
        if (rd_kafka_conf_set(conf, kv[i], kv[i + 1], err, sizeof err) != RD_KAFKA_CONF_OK) {
            log_error("consumer", "event=config_error property=%s", kv[i]);
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    rd_kafka_conf_set_log_cb(conf, on_rdkafka_log);
    return conf;
}

static void on_handle_closed(uv_handle_t *h)
{
    struct consumer *c = h->data;
    c->open_handles--;
    close_progress(c);
}

int consumer_start(struct consumer **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *brokers)
{
    char err[512];
    int rc = -1;
    struct consumer *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    c->loop = loop;
    c->cfg = cfg;
    c->rng = uv_hrtime() | 1;

    metrics_describe("ticketd_consumer_processed_total", "counter",
                     "events whose effects all completed");
    metrics_describe("ticketd_consumer_retries_total", "counter",
                     "failed handling attempts that were retried");
    metrics_describe("ticketd_dlq_produced_total", "counter",
                     "events produced to the dead-letter topic and acknowledged");
    metrics_describe("ticketd_consumer_offset_out_of_range_total", "counter",
                     "fetch positions found outside the log (events may have been deleted)");
    metrics_describe("ticketd_consumer_lag", "gauge",
                     "high watermark minus the next offset to handle, per partition");
    metrics_describe("ticketd_consumer_publish_to_processed_seconds", "histogram",
                     "message timestamp to effects done");

    struct dbp_opts dopts = {.conninfo = cfg->database_url, .size = CONSUMER_DB_POOL,
                             .name = "consumer"};
    if ((rc = dbp_create(&c->db, loop, &dopts)) != 0) goto fail;
    if ((rc = hc_create(&c->hc, loop)) != 0) goto fail;
    if ((rc = effects_create(&c->fx, loop, cfg, cfg->consumer_group, c->db, c->hc)) != 0)
        goto fail;
    rc = -1;

    /* DLQ producer: acks=all + idempotence; delivery reports served on the loop. */
    const char *pkv[] = {"acks", "all", "enable.idempotence", "true", "linger.ms", "5",
                         "client.id", "ticketd-dlq", "log.queue", "true"};
    rd_kafka_conf_t *pconf = conf_for(cfg, brokers, pkv, sizeof pkv / sizeof *pkv);
    if (!pconf) goto fail;
    rd_kafka_conf_set_dr_msg_cb(pconf, dlq_dr_cb);
    rd_kafka_conf_set_opaque(pconf, c);
    c->dlq = rd_kafka_new(RD_KAFKA_PRODUCER, pconf, err, sizeof err);
    if (!c->dlq) {
        rd_kafka_conf_destroy(pconf);
        log_error("consumer", "event=dlq_producer_failed err=\"%s\"", err);
        goto fail;
    }
    rd_kafka_set_log_queue(c->dlq, NULL); /* logs to the main queue, served on the loop */
    c->dlq_q = rd_kafka_queue_get_main(c->dlq);
    if (kafka_bridge_start(&c->dlq_bridge, loop, c->dlq_q, on_dlq_ready, c) != 0) goto fail;

    /* The consumer. auto.offset.reset=earliest, and every reset caused by an error is
     * reported (on_rdkafka_log): see consumer.h. */
    const char *ckv[] = {"group.id", cfg->consumer_group, "enable.auto.commit", "false",
                         "enable.auto.offset.store", "false", "auto.offset.reset", "earliest",
                         "client.id", "ticketd-consumer", "log.queue", "true"};
    rd_kafka_conf_t *cconf = conf_for(cfg, brokers, ckv, sizeof ckv / sizeof *ckv);
    if (!cconf) goto fail;
    rd_kafka_conf_set_rebalance_cb(cconf, rebalance_cb);
    rd_kafka_conf_set_offset_commit_cb(cconf, offset_commit_cb);
    rd_kafka_conf_set_opaque(cconf, c);
    c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, cconf, err, sizeof err);
    if (!c->rk) {
        rd_kafka_conf_destroy(cconf);
        log_error("consumer", "event=consumer_failed err=\"%s\"", err);
        goto fail;
    }
    rd_kafka_set_log_queue(c->rk, NULL); /* main queue -> consumer queue -> the loop */
    rd_kafka_poll_set_consumer(c->rk);
    c->cq = rd_kafka_queue_get_consumer(c->rk);
    if (kafka_bridge_start(&c->cbridge, loop, c->cq, on_consumer_ready, c) != 0) goto fail;

    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, cfg->topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t serr = rd_kafka_subscribe(c->rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (serr) {
        log_error("consumer", "event=subscribe_failed err=\"%s\"", rd_kafka_err2str(serr));
        goto fail;
    }

    uv_timer_init(loop, &c->commit_timer);
    uv_timer_init(loop, &c->poll_timer);
    uv_timer_init(loop, &c->close_timer);
    c->commit_timer.data = c->poll_timer.data = c->close_timer.data = c;
    c->open_handles += 3;
    uv_timer_start(&c->poll_timer, on_poll_timer, POLL_INTERVAL_MS, POLL_INTERVAL_MS);

    lag_consumer = c;
    if (!lag_collector_added) {
        metrics_add_collector(lag_collect, NULL);
        lag_collector_added = true;
    }
    log_info("consumer", "event=started group=%s topic=%s dlq=%s retry_max_attempts=%d"
             " retry_backoff_ms=%" PRId64 " exponential=%d sink=%s email=%s",
             cfg->consumer_group, cfg->topic, cfg->dlq_topic, cfg->retry_max_attempts,
             cfg->retry_backoff_ms, cfg->retry_exponential,
             cfg->data_platform_url[0] ? "on" : "off", cfg->smtp_url[0] ? "on" : "off");
    *out = c;
    return 0;

fail:
    /* Start-up failure: nothing was handed out yet, so a blocking teardown is fine. */
    if (c->cbridge) kafka_bridge_close(c->cbridge);
    if (c->dlq_bridge) kafka_bridge_close(c->dlq_bridge);
    if (c->cq) rd_kafka_queue_destroy(c->cq);
    if (c->dlq_q) rd_kafka_queue_destroy(c->dlq_q);
    if (c->rk) rd_kafka_destroy_flags(c->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    if (c->dlq) rd_kafka_destroy(c->dlq);
    if (c->fx) effects_free(c->fx);
    if (c->hc) hc_close(c->hc, NULL, NULL);
    if (c->db) dbp_close(c->db, NULL, NULL);
    free(c);
    return rc;
}

bool consumer_ready(const struct consumer *c)
{
    return c && c->ready && c->phase == PH_RUNNING;
}

/* ---- close ---- */

static unsigned in_flight(const struct consumer *c)
{
    unsigned n = c->fx ? effects_inflight(c->fx) : 0;
    for (int32_t i = 0; i < c->nparts; i++) {
        const struct cpart *p = c->parts[i];
        if (p && (p->state == P_DLQ_PRODUCING || p->state == P_DLQ_RECORDING)) n++;
    }
    for (const struct cpart *p = c->zombies; p; p = p->next_zombie)
        if (p->state == P_DLQ_PRODUCING || p->state == P_DLQ_RECORDING) n++;
    return n;
}

static void on_db_closed(void *ud);

static void stop_io(struct consumer *c)
{
    c->phase = PH_STOPPING_IO;
    uv_timer_stop(&c->close_timer);
    log_info("consumer", "event=closing_io in_flight=%u", in_flight(c));
    /* Runs still in flight (deadline passed) end now with "closing": not finished, not
     * committed, re-delivered to the next owner. */
    effects_stop(c->fx);
    hc_close(c->hc, NULL, NULL);
    c->hc = NULL;
    dbp_close(c->db, on_db_closed, c);
}

static void on_close_deadline(uv_timer_t *t)
{
    struct consumer *c = t->data;
    if (c->phase == PH_DRAINING) {
        log_warn("consumer", "event=close_drain_timeout in_flight=%u", in_flight(c));
        stop_io(c);
    } else if (c->phase == PH_KAFKA_CLOSING) {
        log_warn("consumer", "event=close_timeout action=destroy");
        close_progress(c);
    }
}

static void destroy_work(uv_work_t *w)
{
    struct consumer *c = w->data;
    /* rd_kafka_destroy joins rdkafka's threads: it may block, so it runs here, off the loop. */
    if (rd_kafka_consumer_closed(c->rk)) rd_kafka_destroy(c->rk);
    else rd_kafka_destroy_flags(c->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    rd_kafka_destroy(c->dlq);
}

static void after_destroy(uv_work_t *w, int status)
{
    struct consumer *c = w->data;
    c->rk = NULL;
    c->dlq = NULL;
    c->phase = PH_DONE;
    uv_close((uv_handle_t *)&c->commit_timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->poll_timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->close_timer, on_handle_closed);
}

static void start_destroy(struct consumer *c)
{
    c->phase = PH_DESTROYING;
    uv_timer_stop(&c->close_timer);
    uv_timer_stop(&c->poll_timer);
    uv_timer_stop(&c->commit_timer);
    if (c->close_bridge) kafka_bridge_close(c->close_bridge);
    c->close_bridge = NULL;
    if (c->close_q) rd_kafka_queue_destroy(c->close_q);
    c->close_q = NULL;
    if (c->cq) rd_kafka_queue_destroy(c->cq);
    c->cq = NULL;
    if (c->dlq_q) rd_kafka_queue_destroy(c->dlq_q);
    c->dlq_q = NULL;
    /* Messages hold references into rd_kafka_t: every one is gone before the destroy. */
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (!p) continue;
        c->parts[i] = NULL;
        p->assigned = false;
        part_free(p);
    }
    while (c->zombies) {
        struct cpart *p = c->zombies;
        c->zombies = p->next_zombie;
        part_free(p);
    }
    c->destroy_work.data = c;
    uv_queue_work(c->loop, &c->destroy_work, destroy_work, after_destroy);
}

static void on_close_queue_ready(void *ud)
{
    struct consumer *c = ud;
    rd_kafka_event_t *ev;
    while (c->close_q && (ev = rd_kafka_queue_poll(c->close_q, 0))) {
        switch (rd_kafka_event_type(ev)) {
        case RD_KAFKA_EVENT_REBALANCE:
            rebalance(c, rd_kafka_event_error(ev), rd_kafka_event_topic_partition_list(ev));
            break;
        case RD_KAFKA_EVENT_OFFSET_COMMIT:
            commit_result(c, rd_kafka_event_error(ev), rd_kafka_event_topic_partition_list(ev));
            break;
        case RD_KAFKA_EVENT_ERROR:
            log_warn("consumer", "event=close_error err=\"%s\"", rd_kafka_event_error_string(ev));
            break;
        default:
            break;
        }
        rd_kafka_event_destroy(ev);
    }
    close_progress(c);
}

static void on_close_poll_timer(uv_timer_t *t)
{
    on_close_queue_ready(t->data);
}

static void on_db_closed(void *ud)
{
    struct consumer *c = ud;
    c->db = NULL;
    effects_free(c->fx);
    c->fx = NULL;

    /* Every run has ended. Commit what finished, stop the DLQ producer's reports, drop the
     * messages nobody will handle, then close the consumer asynchronously. */
    c->phase = PH_KAFKA_CLOSING;
    commit_now(c);
    uv_timer_stop(&c->commit_timer);
    c->commit_scheduled = false;
    kafka_bridge_close(c->dlq_bridge);
    c->dlq_bridge = NULL;
    rd_kafka_purge(c->dlq, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    for (int32_t i = 0; i < c->nparts; i++)
        if (c->parts[i]) part_drop_messages(c->parts[i]);
    while (c->zombies) {
        struct cpart *p = c->zombies;
        c->zombies = p->next_zombie;
        part_free(p);
    }
    kafka_bridge_close(c->cbridge);
    c->cbridge = NULL;

    c->close_q = rd_kafka_queue_new(c->rk);
    rd_kafka_error_t *err = rd_kafka_consumer_close_queue(c->rk, c->close_q);
    if (err) {
        log_warn("consumer", "event=close_failed err=\"%s\"", rd_kafka_error_string(err));
        rd_kafka_error_destroy(err);
        start_destroy(c);
        return;
    }
    if (kafka_bridge_start(&c->close_bridge, c->loop, c->close_q, on_close_queue_ready, c) != 0)
        c->close_bridge = NULL; /* the timer below serves the queue then */
    uv_timer_start(&c->poll_timer, on_close_poll_timer, 50, 50);
    uv_timer_start(&c->close_timer, on_close_deadline, CLOSE_KAFKA_MAX_MS, 0);
}

static void close_progress(struct consumer *c)
{
    switch (c->phase) {
    case PH_DRAINING:
        if (in_flight(c) == 0) stop_io(c);
        break;
    case PH_KAFKA_CLOSING: {
        bool timed_out = !uv_is_active((uv_handle_t *)&c->close_timer);
        if (rd_kafka_consumer_closed(c->rk) || timed_out) {
            log_info("consumer", "event=closed clean=%d", !timed_out);
            start_destroy(c);
        }
        break;
    }
    case PH_DONE:
        if (c->open_handles == 0) {
            void (*done)(void *) = c->close_done;
            void *ud = c->close_ud;
            if (lag_consumer == c) lag_consumer = NULL;
            free(c->parts);
            free(c);
            if (done) done(ud);
        }
        break;
    default:
        break;
    }
}

void consumer_close(struct consumer *c, void (*done)(void *ud), void *ud)
{
    if (!c) {
        if (done) done(ud);
        return;
    }
    if (c->phase != PH_RUNNING) return;
    c->close_done = done;
    c->close_ud = ud;
    c->phase = PH_DRAINING;
    uv_timer_stop(&c->poll_timer);
    /* Events waiting for a retry stay unfinished (re-delivered to the next owner). */
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (p && (p->state == P_BACKOFF || p->state == P_DLQ_WAIT)) {
            uv_timer_stop(&p->timer);
            if (p->cur) rd_kafka_message_destroy(p->cur);
            p->cur = NULL;
            p->state = P_IDLE;
        }
    }
    int64_t grace = c->cfg->shutdown_grace_ms;
    if (grace <= 0 || grace > CLOSE_DRAIN_MAX_MS) grace = CLOSE_DRAIN_MAX_MS;
    log_info("consumer", "event=closing in_flight=%u", in_flight(c));
    uv_timer_start(&c->close_timer, on_close_deadline, (uint64_t)grace, 0);
    close_progress(c);
}
