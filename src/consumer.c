/* consumer: the group consumer, per-partition order, batched effects, retries, DLQ, offsets
 * (see consumer.h). */
#include "consumer.h"

#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "db_pool.h"
#include "dlq_writer.h"
#include "effects.h"
#include "http_client.h"
#include "kafka_common.h"
#include "log.h"
#include "metrics.h"

#define PART_WINDOW 256           /* events per partition in hand (parsed, handed out) */
/* Flow control. Fetched, unfinished events in all partitions: above INHAND_HIGH the
 * partitions holding more than their window are paused, below INHAND_LOW resumed. Pausing is
 * kept rare on purpose: librdkafka drops a paused partition's prefetched messages and takes
 * ~0.5-1 s to fetch again after the resume (measured: a per-partition limit of 512 capped
 * the consumer at ~6,000 events/s with 12 partitions). */
#define INHAND_HIGH 32768
#define INHAND_LOW 16384
#define POINTS_BATCH_CUT 1024     /* events per points statement */
#define MARKS_BATCH_CUT 2048      /* done marks per statement */
#define STATEMENTS_INFLIGHT 2     /* points (and, separately, marks) statements in flight */
#define COMMIT_INTERVAL_MS 200    /* finished offsets are committed at most this often */
#define POLL_INTERVAL_MS 1000    /* serve the consumer even when idle (max.poll.interval.ms) */
#define CLOSE_DRAIN_MAX_MS 10000  /* wait for work in flight at shutdown, at most */
#define CLOSE_KAFKA_MAX_MS 10000  /* wait for the asynchronous consumer close, at most */
#define BACKOFF_MAX_MS 60000      /* cap of the exponential backoff */
#define DB_WAIT_MIN_MS 200        /* waits for our own database: first ... */
#define DB_WAIT_MAX_MS 10000      /* ... and longest (doubling, with jitter) */
#define FETCH_WAIT_MAX_MS "50"   /* see consumer_start */
#define CONSUMER_DB_POOL 4        /* PostgreSQL connections of the consumer */
#define DLQ_MESSAGE_MAX 1000      /* bytes of error message kept in the DLQ header and row */
#define ZOMBIE_MARK_TRIES 3       /* a revoked partition's done marks: statements tried */

/* What a slot in backoff retries when its timer is due (bits: several can be pending). */
enum retry_what {
    RETRY_POINTS = 1,  /* the points statement */
    RETRY_CALL = 2,    /* the external call at the head of its partition's chain */
    RETRY_MARK = 4,    /* a done mark whose statement failed */
    RETRY_DLQ = 8,     /* the DLQ produce, or the dead_letters insert once acknowledged */
};

enum dlq_state { DLQ_NONE, DLQ_WRITING, DLQ_WAIT, DLQ_DONE };

/* Progress of one external effect (data platform, e-mail) of an event. */
struct ext {
    bool want;
    bool called;          /* the call succeeded now, or the DB said done */
    bool committed;       /* its done mark committed, or the DB said done */
    int pending_tries;    /* a mark waiting to be sent: calls to add to attempts */
    bool pending_done;    /* ... and whether one of them succeeded */
    bool sent;            /* a marks statement with this effect is in flight */
    int sent_tries;
    bool sent_done;
};

/* One fetched event, from its fetch until its offset may be committed. */
struct slot {
    struct cpart *p;
    struct slot *next;          /* partition list, offset order */
    struct slot *rprev, *rnext; /* consumer's ready list (waiting for a points statement) */
    struct slot *mprev, *mnext; /* consumer's marks list (marks waiting to be sent) */
    bool in_ready, in_marks;
    rd_kafka_message_t *m;
    struct effects_event ev;
    bool active;                /* in the window: parsed and handed out */
    bool poison;
    bool in_points;             /* in a points statement */
    bool points_ok;             /* the points statement committed */
    bool calling;               /* an external call in flight */
    bool claiming;              /* the e-mail claim statement in flight */
    bool email_claimed;         /* the claim for the next e-mail attempt is ours */
    uint64_t claim_sent_at;     /* uv_now() when that claim was sent */
    int zombie_mark_tries;
    char token[UUID_STR_LEN + 1]; /* this copy's e-mail claim token ("" until needed) */
    enum effects_kind calling_kind;
    struct ext ext[2];          /* by enum effects_kind */
    unsigned retry;             /* enum retry_what bits while in backoff */
    uint64_t retry_at;          /* uv_now() */
    int fails;                  /* failed attempts (the DLQ's dlq_attempts) */
    int db_waits;               /* consecutive waits for our own database (not attempts) */
    enum dlq_state dlq;
    bool finished;              /* handled or dead-lettered: its offset may be committed */
    unsigned ops;               /* callbacks still to come that refer to this slot */
    struct dlq_letter letter;    /* while dead-lettering */
    char err_class[32];
    char *err_msg;              /* the last failure (DLQ_MESSAGE_MAX), allocated on demand */
};

struct cpart {
    struct consumer *c;
    int32_t partition;
    bool assigned;              /* false once revoked: a zombie until busy is 0 */
    struct cpart *next_zombie;
    struct slot *head, *tail;   /* fetched and not finished-and-released, in offset order */
    struct slot *chain;         /* the first slot whose external calls are not all done */
    struct slot *next_inactive; /* the first slot outside the window */
    size_t nslots, nactive;
    unsigned nbackoff;          /* slots waiting for a retry */
    unsigned busy;              /* callbacks still to come for its slots */
    unsigned nmarks;            /* its slots on the consumer's marks list */
    bool paused;
    uv_timer_t timer;           /* the earliest retry of its slots */
    int64_t last_seen;          /* offset of the last message queued */
    int64_t next_commit;        /* last finished offset + 1; -1 = none yet */
    int64_t commit_sent;        /* handed to rd_kafka_commit */
    int64_t commit_acked;       /* acknowledged by the coordinator */
};

enum phase { PH_RUNNING, PH_DRAINING, PH_STOPPING_IO, PH_KAFKA_CLOSING, PH_DESTROYING, PH_DONE };

struct consumer {
    uv_loop_t *loop;
    const struct cfg *cfg;
    rd_kafka_t *rk;             /* group consumer */
    struct dlq_writer *dlq;
    rd_kafka_queue_t *cq, *close_q;
    struct kafka_bridge *cbridge, *close_bridge;
    struct dbp *db;
    struct hc *hc;
    struct effects *fx;
    struct cpart **parts;       /* by partition number; NULL = not assigned */
    int32_t nparts;
    struct cpart *zombies;
    struct slot *ready_head, *ready_tail;
    struct slot *marks_head, *marks_tail;
    size_t nready, nmarks_slots;
    size_t inhand;              /* slots in all partitions */
    bool flow_paused;           /* inhand passed INHAND_HIGH and not yet below INHAND_LOW */
    int points_inflight, marks_inflight;
    uv_timer_t commit_timer, poll_timer, close_timer;
    uv_check_t check;           /* cuts the batches after each poll phase */
    uv_idle_t idle;             /* keeps the loop from blocking while a batch can be sent */
    bool commit_scheduled;
    int commit_failures;        /* consecutive failed commits: the retry interval doubles */
    bool db_unhealthy;          /* a statement failed for the database's sake (logged once) */
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

static void chain_pump(struct cpart *p);
static void slot_check(struct slot *s);
static void dlq_send(struct slot *s);
static void close_progress(struct consumer *c);

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

/* The wait before retrying a step that failed because our own database is unhealthy:
 * doubles per consecutive wait of the slot, from DB_WAIT_MIN_MS (or RETRY_BACKOFF when
 * larger) up to DB_WAIT_MAX_MS, +-25 % jitter. Never an attempt of the event. */
static uint64_t db_wait_ms(struct consumer *c, int waits)
{
    uint64_t base = (uint64_t)c->cfg->retry_backoff_ms;
    if (base < DB_WAIT_MIN_MS) base = DB_WAIT_MIN_MS;
    for (int i = 1; i < waits && base < DB_WAIT_MAX_MS; i++) base *= 2;
    if (base > DB_WAIT_MAX_MS) base = DB_WAIT_MAX_MS;
    return base - base / 4 + next_random(c) % (base / 2 + 1);
}

/* The database state as the consumer's statements see it, logged on changes only. */
static void db_health(struct consumer *c, bool healthy, const char *error)
{
    char qb[600];
    if (healthy == !c->db_unhealthy) return;
    c->db_unhealthy = !healthy;
    if (healthy) {
        log_info("consumer", "event=database_recovered");
        return;
    }
    log_warn("consumer", "event=database_unhealthy action=wait_without_using_attempts err=%s",
             log_quoted(error, qb, sizeof qb));
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

static struct cpart *part_get(struct consumer *c, int32_t partition)
{
    if (partition < 0 || partition >= c->nparts) return NULL;
    return c->parts[partition];
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
    uint64_t delay = COMMIT_INTERVAL_MS;
    for (int i = 0; i < c->commit_failures && delay < DB_WAIT_MAX_MS; i++) delay *= 2;
    uv_timer_start(&c->commit_timer, on_commit_timer,
                   delay < DB_WAIT_MAX_MS ? delay : DB_WAIT_MAX_MS, 0);
}

static void commit_result(struct consumer *c, rd_kafka_resp_err_t err,
                          const rd_kafka_topic_partition_list_t *offsets)
{
    if (err == RD_KAFKA_RESP_ERR__NO_OFFSET) return; /* nothing to commit */
    bool failed = false;
    for (int i = 0; offsets && i < offsets->cnt; i++) {
        const rd_kafka_topic_partition_t *e = &offsets->elems[i];
        struct cpart *p = part_get(c, e->partition);
        rd_kafka_resp_err_t perr = err ? err : e->err;
        if (perr) {
            /* the first of a run of failures at warn, the retries (backing off) at debug */
            log_at(c->commit_failures ? LOG_DEBUG : LOG_WARN, "consumer",
                   "event=commit_failed partition=%" PRId32 " offset=%" PRId64 " err=\"%s\"",
                   e->partition, e->offset, rd_kafka_err2str(perr));
            failed = true;
            if (p && p->commit_sent == e->offset) {
                p->commit_sent = p->commit_acked;
                schedule_commit(c);
            }
        } else if (p && e->offset > p->commit_acked) {
            p->commit_acked = e->offset;
        }
    }
    c->commit_failures = failed ? c->commit_failures + 1 : 0;
}

static void offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                             rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    commit_result(opaque, err, offsets);
}

/* Paused while it holds a full window and one of its events waits to retry (its calls are
 * held back: no point fetching more), or while too much is in hand in all partitions and it
 * holds more than its window. Below a full window it keeps fetching, so the events behind a
 * failing one get their points meanwhile. */
static void update_pause(struct cpart *p)
{
    struct consumer *c = p->c;
    bool want = p->assigned && p->nslots >= PART_WINDOW &&
                (p->nbackoff > 0 || (c->flow_paused && p->nslots > PART_WINDOW));
    set_paused(p, want);
}

/* Counts slots in/out; toggles the flow control with hysteresis. */
static void inhand_add(struct consumer *c, long delta)
{
    c->inhand = (size_t)((long)c->inhand + delta);
    bool was = c->flow_paused;
    if (!was && c->inhand >= INHAND_HIGH) c->flow_paused = true;
    else if (was && c->inhand <= INHAND_LOW) c->flow_paused = false;
    if (was == c->flow_paused) return;
    log_info("consumer", "event=%s in_hand=%zu", c->flow_paused ? "flow_pause" : "flow_resume",
             c->inhand);
    for (int32_t i = 0; i < c->nparts; i++)
        if (c->parts[i]) update_pause(c->parts[i]);
}

/* ---- the ready and marks lists (intrusive, doubly linked) ---- */

static void ready_push(struct slot *s)
{
    struct consumer *c = s->p->c;
    if (s->in_ready) return;
    s->in_ready = true;
    s->rnext = NULL;
    s->rprev = c->ready_tail;
    if (c->ready_tail) c->ready_tail->rnext = s;
    else c->ready_head = s;
    c->ready_tail = s;
    c->nready++;
}

static void ready_remove(struct slot *s)
{
    struct consumer *c = s->p->c;
    if (!s->in_ready) return;
    if (s->rprev) s->rprev->rnext = s->rnext;
    else c->ready_head = s->rnext;
    if (s->rnext) s->rnext->rprev = s->rprev;
    else c->ready_tail = s->rprev;
    s->in_ready = false;
    c->nready--;
}

static void marks_push(struct slot *s)
{
    struct consumer *c = s->p->c;
    if (s->in_marks) return;
    s->in_marks = true;
    s->p->nmarks++;
    s->mnext = NULL;
    s->mprev = c->marks_tail;
    if (c->marks_tail) c->marks_tail->mnext = s;
    else c->marks_head = s;
    c->marks_tail = s;
    c->nmarks_slots++;
}

static void marks_remove(struct slot *s)
{
    struct consumer *c = s->p->c;
    if (!s->in_marks) return;
    if (s->mprev) s->mprev->mnext = s->mnext;
    else c->marks_head = s->mnext;
    if (s->mnext) s->mnext->mprev = s->mprev;
    else c->marks_tail = s->mprev;
    s->in_marks = false;
    s->p->nmarks--;
    c->nmarks_slots--;
}

/* Wakes the loop's check handle soon (a batch may be cut). */
static void on_idle(uv_idle_t *h)
{
    (void)h; /* only keeps the loop from blocking in poll; the check handle does the work */
}

static void kick(struct consumer *c)
{
    if (c->phase < PH_STOPPING_IO && !uv_is_active((uv_handle_t *)&c->idle))
        uv_idle_start(&c->idle, on_idle);
}

/* ---- partitions and slots ---- */

static void slot_free(struct slot *s)
{
    if (s->m) rd_kafka_message_destroy(s->m);
    free(s->err_msg);
    free(s);
}

static void part_on_timer_close(uv_handle_t *h)
{
    struct cpart *p = h->data;
    struct consumer *c = p->c;
    free(p);
    c->open_handles--;
    close_progress(c);
}

static void part_drop_slots(struct cpart *p)
{
    inhand_add(p->c, -(long)p->nslots);
    while (p->head) {
        struct slot *s = p->head;
        p->head = s->next;
        ready_remove(s);
        marks_remove(s);
        slot_free(s);
    }
    p->tail = p->chain = p->next_inactive = NULL;
    p->nslots = p->nactive = 0;
    p->nbackoff = 0;
}

static void part_free(struct cpart *p)
{
    part_drop_slots(p);
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, part_on_timer_close);
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

/* Revoked partitions whose callbacks all arrived are freed here (from the check handle, so
 * that no batch callback is still walking their slots). */
static void reap_zombies(struct consumer *c)
{
    for (struct cpart **pp = &c->zombies; *pp;) {
        struct cpart *p = *pp;
        if (p->busy == 0 && p->nmarks == 0) {
            *pp = p->next_zombie;
            part_free(p);
        } else {
            pp = &p->next_zombie;
        }
    }
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
    /* Nothing more is handed out for it; what is in flight finishes but commits no offset
     * (the next owner redoes it idempotently). Done marks of calls that happened are still
     * written (a dropped one would make the next owner mail again once the claim expired). */
    for (struct slot *s = p->head; s; s = s->next) {
        ready_remove(s);
        if (s->ext[0].pending_done || s->ext[1].pending_done) marks_push(s);
        else marks_remove(s);
    }
    if (p->busy > 0 || p->nmarks > 0) {
        p->next_zombie = c->zombies;
        c->zombies = p;
        log_info("consumer", "event=revoked_in_flight partition=%" PRId32 " callbacks=%u",
                 partition, p->busy);
        return;
    }
    part_free(p);
}

/* A callback referring to s arrived. Returns false when s's partition was revoked (the
 * result is dropped; the zombie is reaped once its last callback arrived). */
static bool slot_release(struct slot *s)
{
    s->ops--;
    s->p->busy--;
    if (!s->p->assigned) {
        kick(s->p->c); /* the check handle reaps it */
        return false;
    }
    return true;
}

static void slot_hold(struct slot *s)
{
    s->ops++;
    s->p->busy++;
}

static void set_error(struct slot *s, const char *error_class, const char *message)
{
    snprintf(s->err_class, sizeof s->err_class, "%s", error_class ? error_class : "unknown");
    if (!s->err_msg) s->err_msg = malloc(DLQ_MESSAGE_MAX);
    if (s->err_msg) {
        snprintf(s->err_msg, DLQ_MESSAGE_MAX, "%s", message ? message : "");
        ascii_only(s->err_msg);
    }
}

static const char *err_msg(const struct slot *s)
{
    return s->err_msg ? s->err_msg : "";
}

/* Parses the slot and hands it out: poison straight to the DLQ, the rest to the points
 * statement of the next tick. */
static void activate(struct slot *s)
{
    char qb[600];
    struct consumer *c = s->p->c;
    rd_kafka_message_t *m = s->m;
    const char *id, *tm;
    size_t id_len, tm_len;
    char why[256];

    s->active = true;
    s->p->nactive++;
    bool has_id = get_header(m, CE_ID, &id, &id_len);
    get_header(m, CE_TIME, &tm, &tm_len);
    if (effects_parse(has_id ? id : NULL, id_len, tm, tm_len, m->payload, m->len, &s->ev, why,
                      sizeof why) != 0) {
        s->poison = true;
        s->fails = 1;
        set_error(s, "unparseable", why);
        log_error("consumer", "event=poison_message partition=%" PRId32 " offset=%" PRId64
                  " err=%s action=dead_letter", s->p->partition, m->offset,
                  log_quoted(err_msg(s), qb, sizeof qb));
        dlq_send(s);
        return;
    }
    s->ev.topic = c->cfg->topic;
    s->ev.partition = s->p->partition;
    s->ev.offset = m->offset;
    s->ext[EFFECTS_DATA_PLATFORM].want = effects_wants_data_platform(c->fx);
    s->ext[EFFECTS_EMAIL].want = effects_wants_email(c->fx, &s->ev);
    ready_push(s);
    kick(c);
}

/* Fills the window with the next fetched slots. */
static void part_activate(struct cpart *p)
{
    while (p->next_inactive && p->nactive < PART_WINDOW && p->assigned &&
           p->c->phase == PH_RUNNING) {
        struct slot *s = p->next_inactive;
        p->next_inactive = s->next;
        activate(s);
    }
}

/* Releases the finished slots at the head of the list: their offsets may be committed. */
static void part_release_finished(struct cpart *p)
{
    struct consumer *c = p->c;
    bool moved = false;
    while (p->head && p->head->finished && p->head->ops == 0) {
        struct slot *s = p->head;
        p->head = s->next;
        if (!p->head) p->tail = NULL;
        if (p->chain == s) p->chain = s->next;
        if (p->next_inactive == s) p->next_inactive = s->next;
        p->next_commit = s->m->offset + 1;
        p->nslots--;
        if (s->active) p->nactive--;
        slot_free(s);
        inhand_add(c, -1);
        moved = true;
    }
    if (!moved) return;
    schedule_commit(c);
    part_activate(p);
    update_pause(p);
}

/* The slot is finished when dead-lettered, or when its points and every enabled external
 * effect (call and done mark) committed. */
static void slot_check(struct slot *s)
{
    struct cpart *p = s->p;
    struct consumer *c = p->c;
    if (!s->finished) {
        bool processed = false;
        if (s->dlq == DLQ_DONE) {
            s->finished = true;
        } else if (s->dlq == DLQ_NONE && s->points_ok && !s->retry &&
                   (!s->ext[0].want || s->ext[0].committed) &&
                   (!s->ext[1].want || s->ext[1].committed)) {
            s->finished = processed = true;
        }
        if (!s->finished) return;
        if (processed) {
            log_debug("consumer", "event=processed partition=%" PRId32 " offset=%" PRId64
                      " event_id=%s", p->partition, s->m->offset, s->ev.event_id);
            metrics_counter_add("ticketd_consumer_processed_total", NULL, 1);
            rd_kafka_timestamp_type_t tstype;
            int64_t ts = rd_kafka_message_timestamp(s->m, &tstype);
            if (ts > 0) {
                int64_t d = wall_ms() - ts;
                metrics_observe("ticketd_consumer_publish_to_processed_seconds", NULL,
                                d > 0 ? (double)d / 1000.0 : 0.0);
            }
        }
    }
    if (p->head == s) part_release_finished(p);
    chain_pump(p);
    if (c->phase != PH_RUNNING) close_progress(c);
}

/* ---- failures: retry or dead-letter, per event ---- */

static void on_retry_timer(uv_timer_t *t);

static void arm_timer(struct cpart *p)
{
    uint64_t first = UINT64_MAX;
    for (struct slot *s = p->head; s; s = s->next)
        if (s->retry && s->retry_at < first) first = s->retry_at;
    if (first == UINT64_MAX) {
        uv_timer_stop(&p->timer);
        return;
    }
    uint64_t now = uv_now(p->c->loop);
    uv_timer_start(&p->timer, on_retry_timer, first > now ? first - now : 0, 0);
}

static void backoff(struct slot *s, unsigned what, uint64_t delay)
{
    struct cpart *p = s->p;
    if (!s->retry) p->nbackoff++;
    s->retry |= what;
    s->retry_at = uv_now(p->c->loop) + delay;
    arm_timer(p);
    update_pause(p);
}

static void clear_backoff(struct slot *s)
{
    if (!s->retry) return;
    s->retry = 0;
    s->p->nbackoff--;
}

/* A failed attempt of s (at the step `what`): retried after the backoff while attempts are
 * left, else dead-lettered. While shutting down the event is left unfinished: its offset is
 * not committed, so the next owner gets it again.
 * Our own database being unhealthy is not the event's fault: unreachable, or an error that
 * dbp_error_is_ours names (read-only after a failover, admin shutdown, disk full, deadlock,
 * serialization failure; class "db_unavailable") is retried after a growing wait
 * (db_wait_ms) without using up an attempt, so it delays events and never dead-letters
 * them. Any other query error counts as an attempt. */
static void slot_fail(struct slot *s, unsigned what, const char *error_class, const char *msg)
{
    char qb[600];
    struct cpart *p = s->p;
    struct consumer *c = p->c;

    set_error(s, error_class, msg);
    if (c->phase != PH_RUNNING || s->dlq != DLQ_NONE) {
        s->fails++;
        close_progress(c);
        return;
    }
    if (strcmp(error_class, "db_unavailable") == 0 ||
        (strcmp(error_class, "db") == 0 && dbp_connected(c->db) == 0)) {
        uint64_t delay = db_wait_ms(c, ++s->db_waits);
        db_health(c, false, msg);
        log_debug("consumer", "event=database_unavailable partition=%" PRId32 " offset=%" PRId64
                 " event_id=%s action=wait next_in_ms=%" PRIu64, p->partition, s->m->offset,
                 s->ev.event_id, delay);
        metrics_counter_add("ticketd_consumer_db_unavailable_total", NULL, 1);
        backoff(s, what, delay);
        return;
    }
    s->db_waits = 0;
    s->fails++;
    if (s->fails < c->cfg->retry_max_attempts) {
        uint64_t delay = backoff_ms(c, s->fails);
        metrics_counter_add("ticketd_consumer_retries_total", NULL, 1);
        log_warn("consumer", "event=retry partition=%" PRId32 " offset=%" PRId64
                 " event_id=%s attempt=%d of=%d next_in_ms=%" PRIu64 " class=%s err=%s",
                 p->partition, s->m->offset, s->ev.event_id, s->fails,
                 c->cfg->retry_max_attempts, delay, s->err_class,
                 log_quoted(err_msg(s), qb, sizeof qb));
        backoff(s, what, delay);
        return;
    }
    log_error("consumer", "event=attempts_exhausted partition=%" PRId32 " offset=%" PRId64
              " event_id=%s attempts=%d class=%s err=%s action=dead_letter",
              p->partition, s->m->offset, s->ev.event_id, s->fails, s->err_class,
              log_quoted(err_msg(s), qb, sizeof qb));
    clear_backoff(s);
    ready_remove(s);
    dlq_send(s);
}

static void on_retry_timer(uv_timer_t *t)
{
    struct cpart *p = t->data;
    struct consumer *c = p->c;
    if (!p->assigned || c->phase != PH_RUNNING) return;
    uint64_t now = uv_now(c->loop);
    for (struct slot *s = p->head; s; s = s->next) {
        if (!s->retry || s->retry_at > now) continue;
        unsigned what = s->retry;
        clear_backoff(s);
        if (what & RETRY_DLQ) {
            if (s->dlq == DLQ_WAIT) dlq_send(s);
            continue;
        }
        if (what & RETRY_POINTS) {
            ready_push(s);
            kick(c);
        }
        if (what & RETRY_MARK) {
            for (int k = 0; k < 2; k++)
                if (s->ext[k].pending_tries > 0 && !s->ext[k].sent) marks_push(s);
            kick(c);
        }
        /* RETRY_CALL: the chain below starts the call again */
    }
    arm_timer(p);
    update_pause(p);
    chain_pump(p);
}

/* ---- external calls: in offset order per partition, one at a time ---- */

static void on_call_done(void *ud, const struct effects_call_result *r);

static bool calls_done(const struct slot *s)
{
    return (!s->ext[0].want || s->ext[0].called) && (!s->ext[1].want || s->ext[1].called);
}

/* A mark for effect k of s: one more call, done or failed. */
static void add_mark(struct slot *s, enum effects_kind k, bool done)
{
    s->ext[k].pending_tries++;
    if (done) s->ext[k].pending_done = true;
    if (!s->ext[k].sent) marks_push(s);
    kick(s->p->c);
}

static uint64_t claim_ttl_ms(const struct consumer *c)
{
    return (uint64_t)c->cfg->http_timeout_ms * 2 + 10000;
}

static void on_claim(void *ud, enum effects_claim result, const char *error, bool db_fault)
{
    struct slot *s = ud;
    s->claiming = false;
    if (!slot_release(s)) return;
    struct consumer *c = s->p->c;
    if (error) {
        slot_fail(s, RETRY_CALL, db_fault ? "db_unavailable" : "db", error);
        return;
    }
    db_health(c, true, NULL);
    switch (result) {
    case EFFECTS_CLAIMED:
        /* a claim that took long to come back (the process was paused) is not trusted to
         * last through the call: claim again */
        s->email_claimed = uv_now(c->loop) - s->claim_sent_at < claim_ttl_ms(c) / 2;
        break;
    case EFFECTS_CLAIM_DONE: /* another copy sent it and its done mark committed */
        log_debug("consumer", "event=email_already_sent partition=%" PRId32 " offset=%" PRId64
                  " event_id=%s", s->p->partition, s->m->offset, s->ev.event_id);
        s->ext[EFFECTS_EMAIL].called = s->ext[EFFECTS_EMAIL].committed = true;
        slot_check(s);
        return;
    case EFFECTS_CLAIM_HELD: /* another copy is sending it: wait for its done mark */
        log_debug("consumer", "event=email_claimed_elsewhere partition=%" PRId32
                  " offset=%" PRId64 " event_id=%s action=wait", s->p->partition, s->m->offset,
                  s->ev.event_id);
        backoff(s, RETRY_CALL, db_wait_ms(c, ++s->db_waits));
        return;
    }
    chain_pump(s->p);
}

/* A random UUID (version 4) naming this copy of the event in its e-mail claims. */
static void make_token(struct slot *s)
{
    uint8_t b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        uint64_t x = next_random(s->p->c), y = uv_hrtime() ^ (uint64_t)(uintptr_t)s;
        memcpy(b, &x, 8);
        memcpy(b + 8, &y, 8);
    }
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(s->token, sizeof s->token,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
             b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
             b[15]);
}

static void claim_email(struct slot *s)
{
    struct consumer *c = s->p->c;
    if (!s->token[0]) make_token(s);
    int rc = effects_claim_email(c->fx, s->ev.event_id, s->token, (int64_t)claim_ttl_ms(c),
                                 on_claim, s);
    if (rc != 0) {
        slot_fail(s, RETRY_CALL, "db_unavailable", "email claim: database unavailable");
        return;
    }
    s->claiming = true;
    s->claim_sent_at = uv_now(c->loop);
    slot_hold(s);
}

/* Starts the next external call of the partition: the calls of one event in the fixed order
 * data platform, e-mail; the next event only after both succeeded (so the sink receives a
 * partition's events in offset order, retries included). */
static void chain_pump(struct cpart *p)
{
    struct consumer *c = p->c;
    while (p->chain && p->assigned) {
        struct slot *s = p->chain;
        if (s->finished || (s->dlq == DLQ_NONE && s->points_ok && calls_done(s))) {
            p->chain = s->next;
            continue;
        }
        if (!s->points_ok || s->calling || s->claiming || (s->retry & RETRY_CALL) ||
            s->dlq != DLQ_NONE || c->phase != PH_RUNNING)
            return;
        enum effects_kind k = s->ext[EFFECTS_DATA_PLATFORM].want &&
                                      !s->ext[EFFECTS_DATA_PLATFORM].called
                                  ? EFFECTS_DATA_PLATFORM
                                  : EFFECTS_EMAIL;
        if (k == EFFECTS_EMAIL && !s->email_claimed) {
            claim_email(s);
            return;
        }
        s->email_claimed = false; /* one claim, one attempt */
        int rc = effects_call(c->fx, k, &s->ev, on_call_done, s);
        if (rc != 0) {
            char msg[128];
            snprintf(msg, sizeof msg, "%s: could not start the request: %s",
                     k == EFFECTS_DATA_PLATFORM ? "data_platform" : "email", strerror(-rc));
            s->ext[k].pending_tries++; /* recorded like any failed call */
            if (!s->ext[k].sent) marks_push(s);
            slot_fail(s, RETRY_CALL,
                      rc == -ECANCELED ? "closing"
                      : k == EFFECTS_DATA_PLATFORM ? "sink_transport" : "smtp", msg);
            return;
        }
        s->calling = true;
        s->calling_kind = k;
        slot_hold(s);
        return;
    }
}

static void on_call_done(void *ud, const struct effects_call_result *r)
{
    struct slot *s = ud;
    enum effects_kind k = s->calling_kind;
    s->calling = false;
    if (!slot_release(s)) {
        /* revoked meanwhile: a call that happened still gets its done mark */
        if (r->ok) add_mark(s, k, true);
        return;
    }
    struct cpart *p = s->p;
    if (s->dlq != DLQ_NONE) { /* dead-lettered meanwhile (a done mark ran out of attempts) */
        slot_check(s);
        return;
    }
    if (r->ok) {
        s->ext[k].called = true;
        add_mark(s, k, true);
        chain_pump(p);
        return;
    }
    add_mark(s, k, false);
    slot_fail(s, RETRY_CALL, r->error_class, r->error_message);
}

/* ---- batches: one points statement and one marks statement for many events ---- */

struct batch {
    struct consumer *c;
    size_t n;
    struct slot *slots[];
};

static void on_points(void *ud, const struct effects_points_result *res, const char *error,
                      bool db_fault)
{
    struct batch *b = ud;
    struct consumer *c = b->c;
    c->points_inflight--;
    if (res) db_health(c, true, NULL);
    for (size_t i = 0; i < b->n; i++) {
        struct slot *s = b->slots[i];
        s->in_points = false;
        if (!slot_release(s)) continue;
        if (!res) {
            slot_fail(s, RETRY_POINTS, db_fault ? "db_unavailable" : "db", error);
            continue;
        }
        s->db_waits = 0;
        s->points_ok = true;
        for (int k = 0; k < 2; k++) {
            bool done = k == EFFECTS_DATA_PLATFORM ? res[i].data_platform_done : res[i].email_done;
            if (s->ext[k].want && done) s->ext[k].called = s->ext[k].committed = true;
        }
        if (res[i].points_granted)
            log_debug("consumer", "event=points_granted partition=%" PRId32 " offset=%" PRId64
                      " event_id=%s", s->p->partition, s->m->offset, s->ev.event_id);
        struct cpart *p = s->p;
        slot_check(s); /* may release s */
        chain_pump(p);
    }
    free(b);
    if (c->phase != PH_RUNNING) close_progress(c);
}

static void send_points(struct consumer *c)
{
    size_t n = c->nready < POINTS_BATCH_CUT ? c->nready : POINTS_BATCH_CUT;
    struct batch *b = malloc(sizeof *b + n * sizeof b->slots[0]);
    const struct effects_event **evs = malloc(n * sizeof *evs);
    if (!b || !evs) {
        free(b);
        free(evs);
        return; /* out of memory: the next tick tries again */
    }
    b->c = c;
    b->n = n;
    struct slot *s = c->ready_head;
    for (size_t i = 0; i < n; i++, s = s->rnext) {
        b->slots[i] = s;
        evs[i] = &s->ev;
    }
    int rc = effects_points_batch(c->fx, evs, n, on_points, b);
    free(evs);
    for (size_t i = 0; i < n; i++) ready_remove(b->slots[i]);
    if (rc != 0) {
        /* could not even start (database down, queue full): a failed attempt like any other */
        const char *why = rc == -ENOTCONN ? "points: database unavailable" : strerror(-rc);
        for (size_t i = 0; i < n; i++) slot_fail(b->slots[i], RETRY_POINTS, "db_unavailable", why);
        free(b);
        return;
    }
    c->points_inflight++;
    for (size_t i = 0; i < n; i++) {
        b->slots[i]->in_points = true;
        slot_hold(b->slots[i]);
    }
}

static void on_marks(void *ud, bool ok, const char *error, bool db_fault)
{
    struct batch *b = ud;
    struct consumer *c = b->c;
    c->marks_inflight--;
    if (ok) db_health(c, true, NULL);
    for (size_t i = 0; i < b->n; i++) {
        struct slot *s = b->slots[i];
        bool done_failed = false;
        const char *effect = "";
        for (int k = 0; k < 2; k++) {
            struct ext *e = &s->ext[k];
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
                effect = k == EFFECTS_DATA_PLATFORM ? "data_platform" : "email";
            } else {
                char qb[600];
                log_warn("effects", "event=mark_failed_error event_id=%s err=%s",
                         s->ev.event_id, log_quoted(error, qb, sizeof qb));
            }
        }
        if (!slot_release(s)) {
            /* revoked: its done marks are still written, a few statements at most */
            if (done_failed && ++s->zombie_mark_tries < ZOMBIE_MARK_TRIES) {
                marks_push(s);
            } else if (done_failed) {
                char qb[600];
                log_warn("consumer", "event=done_mark_lost event_id=%s effect=%s err=%s"
                         " note=\"revoked partition: the next owner redoes it\"",
                         s->ev.event_id, effect, log_quoted(error, qb, sizeof qb));
            }
            continue;
        }
        if (done_failed) {
            char msg[700];
            snprintf(msg, sizeof msg, "recording %s done: %s", effect, error ? error : "");
            slot_fail(s, RETRY_MARK, db_fault ? "db_unavailable" : "db", msg);
        } else {
            for (int k = 0; k < 2; k++)
                if (s->ext[k].pending_tries > 0 && !(s->retry & RETRY_MARK)) marks_push(s);
        }
        slot_check(s); /* may release s */
    }
    free(b);
    if (c->phase != PH_RUNNING) close_progress(c);
}

static void send_marks(struct consumer *c)
{
    size_t cap = c->nmarks_slots < MARKS_BATCH_CUT / 2 ? c->nmarks_slots : MARKS_BATCH_CUT / 2;
    struct batch *b = malloc(sizeof *b + cap * sizeof b->slots[0]);
    struct effects_mark *marks = malloc(cap * 2 * sizeof *marks);
    if (!b || !marks) {
        free(b);
        free(marks);
        return;
    }
    b->c = c;
    b->n = 0;
    size_t nm = 0;
    for (struct slot *s = c->marks_head; s && b->n < cap; s = s->mnext) {
        b->slots[b->n++] = s;
        for (int k = 0; k < 2; k++) {
            struct ext *e = &s->ext[k];
            if (e->pending_tries == 0 || e->sent) continue;
            marks[nm++] = (struct effects_mark){
                .event_id = s->ev.event_id, .effect = (enum effects_kind)k,
                .done = e->pending_done, .tries = e->pending_tries,
                .error = e->pending_done ? NULL : err_msg(s)};
        }
    }
    int rc = nm ? effects_mark_batch(c->fx, marks, nm, on_marks, b) : -EINVAL;
    free(marks);
    if (rc != 0) {
        /* not sent: the marks stay pending; a database that is down fails the events */
        for (size_t i = 0; i < b->n; i++) {
            struct slot *s = b->slots[i];
            marks_remove(s);
            bool done = s->ext[0].pending_done || s->ext[1].pending_done;
            if (done)
                slot_fail(s, RETRY_MARK, "db_unavailable", "recording done: database unavailable");
        }
        free(b);
        return;
    }
    c->marks_inflight++;
    for (size_t i = 0; i < b->n; i++) {
        struct slot *s = b->slots[i];
        for (int k = 0; k < 2; k++) {
            struct ext *e = &s->ext[k];
            if (e->pending_tries == 0 || e->sent) continue;
            e->sent = true;
            e->sent_tries = e->pending_tries;
            e->sent_done = e->pending_done;
            e->pending_tries = 0;
            e->pending_done = false;
        }
        marks_remove(s);
        slot_hold(s);
    }
}

/* After each poll phase: cut the batches while a connection is idle (under load the lists
 * grow while the statements run, so the next batch is bigger: one commit serves many). */
static void on_check(uv_check_t *h)
{
    struct consumer *c = h->data;
    if (c->zombies) reap_zombies(c);
    if (c->phase >= PH_STOPPING_IO || !c->db) {
        uv_idle_stop(&c->idle);
        return;
    }
    while (c->marks_head && c->marks_inflight < STATEMENTS_INFLIGHT && dbp_idle(c->db) > 0) {
        size_t before = c->nmarks_slots;
        send_marks(c);
        if (c->nmarks_slots >= before) break;
    }
    while (c->phase == PH_RUNNING && c->ready_head && c->points_inflight < STATEMENTS_INFLIGHT &&
           dbp_idle(c->db) > 0) {
        size_t before = c->nready;
        send_points(c);
        if (c->nready >= before) break;
    }
    bool more = (c->marks_head && c->marks_inflight < STATEMENTS_INFLIGHT) ||
                (c->phase == PH_RUNNING && c->ready_head &&
                 c->points_inflight < STATEMENTS_INFLIGHT);
    /* stay awake only while something can be sent now; results wake the loop otherwise */
    if (more && dbp_idle(c->db) > 0) uv_idle_start(&c->idle, on_idle);
    else uv_idle_stop(&c->idle);
    if (c->phase == PH_DRAINING) close_progress(c);
}

/* ---- dead letters ---- */

/* The DLQ produce or the dead_letters insert failed: retried after a growing wait. */
static void dlq_wait(struct slot *s)
{
    s->dlq = DLQ_WAIT;
    backoff(s, RETRY_DLQ, db_wait_ms(s->p->c, ++s->db_waits));
}

/* Shutting down or revoked: the event is left unfinished (re-delivered to the next owner). */
static void dlq_abandon(struct slot *s)
{
    s->dlq = DLQ_WAIT;
    close_progress(s->p->c);
}

/* Hands s to the DLQ writer (dlq_writer.h): the produce, or only the dead_letters row once
 * the produce was acknowledged. */
static void dlq_send(struct slot *s)
{
    struct cpart *p = s->p;
    struct consumer *c = p->c;
    struct dlq_letter *l = &s->letter;
    char err[256];
    enum dlq_step step;

    if (!p->assigned) return;
    if (c->phase != PH_RUNNING) {
        dlq_abandon(s);
        return;
    }
    if (s->dlq == DLQ_NONE) l->dlq_partition = -1;
    s->dlq = DLQ_WRITING;
    l->m = s->m;
    l->poison = s->poison;
    l->event_id = s->ev.event_id;
    l->application_id = s->ev.application_id;
    l->attempts = s->fails;
    l->error_class = s->err_class;
    l->error_message = err_msg(s);
    l->ud = s;
    if (dlq_writer_write(c->dlq, l, &step, err, sizeof err) != 0) {
        if (step == DLQ_STEP_PRODUCE)
            log_error("consumer", "event=dlq_produce_failed partition=%" PRId32
                      " offset=%" PRId64 " err=\"%s\" action=retry", p->partition, s->m->offset,
                      err);
        else
            log_error("consumer", "event=dead_letter_record_failed partition=%" PRId32
                      " offset=%" PRId64 " err=\"%s\" action=retry", p->partition,
                      s->m->offset, err);
        if (!p->assigned || c->phase != PH_RUNNING) dlq_abandon(s);
        else dlq_wait(s);
        return;
    }
    slot_hold(s);
}

/* The writer's verdict. A revoked partition's letter is still written (the message is in
 * the DLQ once acknowledged); its result is dropped. */
static void on_dead_letter(struct dlq_letter *l, bool ok, enum dlq_step failed,
                           const char *error)
{
    char qb[600];
    struct slot *s = l->ud;
    struct cpart *p = s->p;
    struct consumer *c = p->c;

    s->ops--;
    p->busy--;
    if (!ok) {
        if (failed == DLQ_STEP_PRODUCE)
            log_error("consumer", "event=dlq_delivery_failed partition=%" PRId32
                      " offset=%" PRId64 " err=\"%s\" action=retry", p->partition,
                      s->m->offset, error);
        else
            log_error("consumer", "event=dead_letter_record_failed partition=%" PRId32
                      " offset=%" PRId64 " err=%s action=%s", p->partition, s->m->offset,
                      log_quoted(error, qb, sizeof qb),
                      c->phase == PH_RUNNING ? "retry" : "redeliver_later");
        if (!p->assigned || c->phase != PH_RUNNING) {
            kick(c);
            dlq_abandon(s);
            return;
        }
        dlq_wait(s);
        return;
    }
    if (!p->assigned) {
        kick(c); /* the check handle reaps it */
        return;
    }
    log_warn("consumer", "event=dead_lettered partition=%" PRId32 " offset=%" PRId64
             " event_id=%s dlq_partition=%" PRId32 " dlq_offset=%" PRId64 " class=%s",
             p->partition, s->m->offset, s->poison ? "-" : s->ev.event_id, l->dlq_partition,
             l->dlq_offset, s->err_class);
    s->dlq = DLQ_DONE;
    slot_check(s);
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
                  " run ticketd audit\"", c->cfg->topic, partition, m->offset, log_quoted(why, qb, sizeof qb));
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
                     rd_kafka_err2str(m->err), log_quoted(rd_kafka_message_errstr(m), qb, sizeof qb));
        rd_kafka_message_destroy(m);
        return;
    }
    struct cpart *p = part_get(c, m->partition);
    if (!p || !p->assigned || c->phase != PH_RUNNING ||
        strcmp(rd_kafka_topic_name(m->rkt), c->cfg->topic) != 0 || m->offset <= p->last_seen) {
        rd_kafka_message_destroy(m); /* not ours (any more), or already queued */
        return;
    }
    struct slot *s = calloc(1, sizeof *s);
    if (!s) {
        /* Cannot hold it: rewind the partition to it so it is fetched again. */
        rd_kafka_topic_partition_list_t *l = one_partition(c, m->partition, m->offset);
        rd_kafka_error_t *err = rd_kafka_seek_partitions(c->rk, l, 0);
        if (err) rd_kafka_error_destroy(err);
        rd_kafka_topic_partition_list_destroy(l);
        rd_kafka_message_destroy(m);
        return;
    }
    s->p = p;
    s->m = m;
    if (p->tail) p->tail->next = s;
    else p->head = s;
    p->tail = s;
    if (!p->chain) p->chain = s;
    if (!p->next_inactive) p->next_inactive = s;
    p->nslots++;
    p->last_seen = m->offset;
    inhand_add(c, 1);
    part_activate(p);
    update_pause(p);
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
        if (p->head) pos = p->head->m->offset;
        else if (p->next_commit >= 0) pos = p->next_commit;
        else if (p->commit_acked >= 0) pos = p->commit_acked;
        else continue;
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", p->partition);
        metrics_gauge_set("ticketd_consumer_lag", labels, (double)(hi > pos ? hi - pos : 0));
    }
}

/* rdkafka's own log lines (kafka_log_cb). With log.queue they are served by our polls, on
 * the loop. An offset reset caused by an error (out of range, log truncation) is logged by
 * rdkafka at warning level with facility OFFSET ("<topic> [<partition>]: offset reset (at
 * offset ..."); resets for a missing committed offset (a new group) only at debug level. */
static void on_consumer_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    if (level <= 4 && strcmp(fac, "OFFSET") == 0 && strstr(buf, "offset reset")) {
        char quoted[512];
        log_quote(buf, quoted, sizeof quoted);
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
    kafka_log_cb(rk, level, fac, buf);
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
    rd_kafka_conf_set_log_cb(conf, on_consumer_log);
    return conf;
}

/* The drain bound of a dead member: its partitions move after session.timeout.ms
 * (CONSUMER_SESSION_TIMEOUT; heartbeats every third of it). With a group.instance.id
 * (CONSUMER_INSTANCE_ID) the member is static: a restart within the timeout takes its
 * partitions back without a rebalance. KAFKA_CONFIG, applied first, is overridden only for
 * properties it does not set. */
static int membership_conf(rd_kafka_conf_t *conf, const struct cfg *cfg)
{
    char err[512], session[24], heartbeat[24];
    const char *extra = cfg->kafka_config ? cfg->kafka_config : "";
    snprintf(session, sizeof session, "%" PRId64, cfg->consumer_session_timeout_ms);
    snprintf(heartbeat, sizeof heartbeat, "%" PRId64,
             cfg->consumer_session_timeout_ms / 3 > 0 ? cfg->consumer_session_timeout_ms / 3 : 1);
    const char *kv[] = {"session.timeout.ms", session, "heartbeat.interval.ms", heartbeat,
                        "group.instance.id", cfg->consumer_instance_id};
    for (size_t i = 0; i + 1 < sizeof kv / sizeof *kv; i += 2) {
        if (strstr(extra, kv[i]) || !kv[i + 1] || !kv[i + 1][0]) continue;
        if (rd_kafka_conf_set(conf, kv[i], kv[i + 1], err, sizeof err) != RD_KAFKA_CONF_OK) {
            log_error("consumer", "event=config_error property=%s err=\"%s\"", kv[i], err);
            return -1;
        }
    }
    return 0;
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
    metrics_describe("ticketd_consumer_offset_out_of_range_total", "counter",
                     "fetch positions found outside the log (events may have been deleted)");
    metrics_describe("ticketd_consumer_lag", "gauge",
                     "high watermark minus the next offset to handle, per partition");
    metrics_describe("ticketd_consumer_publish_to_processed_seconds", "histogram",
                     "message timestamp to effects done");
    metrics_describe("ticketd_consumer_db_unavailable_total", "counter",
                     "steps that waited for our own database (no attempt used)");

    struct dbp_opts dopts = {.conninfo = cfg->database_url, .size = CONSUMER_DB_POOL,
                             .name = "consumer"};
    if ((rc = dbp_create(&c->db, loop, &dopts)) != 0) goto fail;
    if ((rc = hc_create(&c->hc, loop)) != 0) goto fail;
    if ((rc = effects_create(&c->fx, loop, cfg, cfg->consumer_group, c->db, c->hc)) != 0)
        goto fail;
    rc = -1;

    /* The dead-letter writer: its own producer, delivery reports served on the loop. */
    if (dlq_writer_create(&c->dlq, loop, cfg, brokers, c->db, on_dead_letter) != 0) goto fail;

    /* The consumer. auto.offset.reset=earliest, and every reset caused by an error is
     * reported (on_consumer_log): see consumer.h. */
    const char *ckv[] = {"group.id", cfg->consumer_group, "enable.auto.commit", "false",
                         "enable.auto.offset.store", "false", "auto.offset.reset", "earliest",
                         "client.id", "ticketd-consumer", "log.queue", "true",
                         /* An idle fetch waits at most this long for data (default 500 ms):
                          * the mock cluster answers a waiting fetch only when it expires, so
                          * it bounded publish->processed from below. KAFKA_CONFIG wins. */
                         "fetch.wait.max.ms", FETCH_WAIT_MAX_MS};
    size_t nckv = sizeof ckv / sizeof *ckv;
    if (cfg->kafka_config && strstr(cfg->kafka_config, "fetch.wait.max.ms")) nckv -= 2;
    rd_kafka_conf_t *cconf = conf_for(cfg, brokers, ckv, nckv);
    if (!cconf) goto fail;
    if (membership_conf(cconf, cfg) != 0) {
        rd_kafka_conf_destroy(cconf);
        goto fail;
    }
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
    uv_check_init(loop, &c->check);
    uv_idle_init(loop, &c->idle);
    c->commit_timer.data = c->poll_timer.data = c->close_timer.data = c;
    c->check.data = c->idle.data = c;
    c->open_handles += 5;
    uv_check_start(&c->check, on_check);
    uv_unref((uv_handle_t *)&c->check); /* work in flight keeps the loop alive, not this */
    uv_timer_start(&c->poll_timer, on_poll_timer, POLL_INTERVAL_MS, POLL_INTERVAL_MS);

    lag_consumer = c;
    if (!lag_collector_added) {
        metrics_add_collector(lag_collect, NULL);
        lag_collector_added = true;
    }
    log_info("consumer", "event=started group=%s topic=%s dlq=%s retry_max_attempts=%d"
             " retry_backoff_ms=%" PRId64 " exponential=%d sink=%s email=%s window=%d",
             cfg->consumer_group, cfg->topic, cfg->dlq_topic, cfg->retry_max_attempts,
             cfg->retry_backoff_ms, cfg->retry_exponential,
             cfg->data_platform_url[0] ? "on" : "off", cfg->smtp_url[0] ? "on" : "off",
             PART_WINDOW);
    *out = c;
    return 0;

fail:
    /* Start-up failure: nothing was handed out yet, so a blocking teardown is fine. */
    if (c->cbridge) kafka_bridge_close(c->cbridge);
    if (c->cq) rd_kafka_queue_destroy(c->cq);
    if (c->rk) rd_kafka_destroy_flags(c->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    dlq_writer_free(c->dlq);
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

/* Statements, calls and DLQ deliveries in flight, plus done marks still to write (they
 * spare the next owner a repeated call). */
static unsigned in_flight(const struct consumer *c)
{
    unsigned n = c->fx ? effects_inflight(c->fx) : 0;
    return n + dlq_writer_inflight(c->dlq) + (unsigned)c->nmarks_slots;
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
    dlq_writer_free(c->dlq);
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
    uv_close((uv_handle_t *)&c->check, on_handle_closed);
    uv_close((uv_handle_t *)&c->idle, on_handle_closed);
}

static void start_destroy(struct consumer *c)
{
    c->phase = PH_DESTROYING;
    uv_timer_stop(&c->close_timer);
    uv_timer_stop(&c->poll_timer);
    uv_timer_stop(&c->commit_timer);
    uv_check_stop(&c->check);
    uv_idle_stop(&c->idle);
    if (c->close_bridge) kafka_bridge_close(c->close_bridge);
    c->close_bridge = NULL;
    if (c->close_q) rd_kafka_queue_destroy(c->close_q);
    c->close_q = NULL;
    if (c->cq) rd_kafka_queue_destroy(c->cq);
    c->cq = NULL;
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
    dlq_writer_stop(c->dlq);
    for (int32_t i = 0; i < c->nparts; i++)
        if (c->parts[i]) part_drop_slots(c->parts[i]);
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
    /* Events waiting for a retry, or not handed out yet, stay unfinished (re-delivered to
     * the next owner); what is in flight may finish, and its done marks are written. */
    for (int32_t i = 0; i < c->nparts; i++)
        if (c->parts[i]) uv_timer_stop(&c->parts[i]->timer);
    int64_t grace = c->cfg->shutdown_grace_ms;
    if (grace <= 0 || grace > CLOSE_DRAIN_MAX_MS) grace = CLOSE_DRAIN_MAX_MS;
    log_info("consumer", "event=closing in_flight=%u", in_flight(c));
    uv_timer_start(&c->close_timer, on_close_deadline, (uint64_t)grace, 0);
    close_progress(c);
}
