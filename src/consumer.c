/* consumer: the group consumer, partitions and their windows, retries, the hand-off to the
 * DLQ writer, offsets (see consumer.h). An event's effects run behind effects_run. */
#include "consumer.h"
#include "consumer_int.h"

#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "db_pool.h"
#include "dlq_writer.h"
#include "effects.h"
#include "http_client.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"
#include "metrics.h"

static void slot_check(struct slot *s);
static void dlq_send(struct slot *s);
static void slot_run(struct slot *s);

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

rd_kafka_topic_partition_list_t *cons_one_partition(struct consumer *c, int32_t partition,
                                                      int64_t offset)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, c->cfg->topic, partition)->offset = offset;
    return l;
}

void cons_set_paused(struct cpart *p, bool want)
{
    struct consumer *c = p->c;
    if (want == p->paused) return;
    rd_kafka_topic_partition_list_t *l = cons_one_partition(c, p->partition, RD_KAFKA_OFFSET_INVALID);
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

struct cpart *cons_part_get(struct consumer *c, int32_t partition)
{
    if (partition < 0 || partition >= c->nparts) return NULL;
    return c->parts[partition];
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
    cons_set_paused(p, want);
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
    cons_close_progress(c);
}

void cons_part_drop_slots(struct cpart *p)
{
    inhand_add(p->c, -(long)p->nslots);
    while (p->head) {
        struct slot *s = p->head;
        p->head = s->next;
        slot_free(s);
    }
    p->tail = p->next_inactive = NULL;
    p->nslots = p->nactive = 0;
    p->nbackoff = 0;
}

void cons_part_free(struct cpart *p)
{
    cons_part_drop_slots(p);
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

/* Revoked partitions whose DLQ writer callbacks all arrived are freed here (from the poll,
 * never from inside the writer's callback). */
static void reap_zombies(struct consumer *c)
{
    for (struct cpart **pp = &c->zombies; *pp;) {
        struct cpart *p = *pp;
        if (p->busy == 0) {
            *pp = p->next_zombie;
            cons_part_free(p);
        } else {
            pp = &p->next_zombie;
        }
    }
}

static void part_revoke(struct consumer *c, int32_t partition)
{
    struct cpart *p = cons_part_get(c, partition);
    if (!p) return;
    c->parts[partition] = NULL;
    cons_set_paused(p, false); /* pause flags could outlive the assignment */
    p->assigned = false;
    uv_timer_stop(&p->timer);
    char labels[48];
    snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", partition);
    metrics_gauge_set("ticketd_consumer_lag", labels, 0);
    /* Nothing more is handed out for it; what is in flight finishes but commits no offset
     * (the next owner redoes it idempotently). The effects of its events report nothing
     * more (effects_detach: they still write the done marks of calls that happened). */
    effects_detach(c->fx, partition);
    for (struct slot *s = p->head; s; s = s->next) s->run = NULL;
    if (p->busy > 0) {
        p->next_zombie = c->zombies;
        c->zombies = p;
        log_info("consumer", "event=revoked_in_flight partition=%" PRId32 " callbacks=%u",
                 partition, p->busy);
        return;
    }
    cons_part_free(p);
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
    slot_run(s);
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
        if (p->next_inactive == s) p->next_inactive = s->next;
        p->next_commit = s->m->offset + 1;
        p->nslots--;
        if (s->active) p->nactive--;
        slot_free(s);
        inhand_add(c, -1);
        moved = true;
    }
    if (!moved) return;
    cons_schedule_commit(c);
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
        } else if (s->dlq == DLQ_NONE && s->effects_done && !s->retry) {
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
    if (s->run) { /* dead-lettered: its partition's later calls may go on */
        effects_release(c->fx, s->run);
        s->run = NULL;
    }
    if (p->head == s) part_release_finished(p);
    if (c->phase != PH_RUNNING) cons_close_progress(c);
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
static void slot_fail(struct slot *s, unsigned what, const char *error_class, const char *msg,
                      bool db_fault)
{
    char qb[600];
    struct cpart *p = s->p;
    struct consumer *c = p->c;

    set_error(s, error_class, msg);
    if (c->phase != PH_RUNNING || s->dlq != DLQ_NONE) {
        s->fails++;
        cons_close_progress(c);
        return;
    }
    if (db_fault) { /* logged once by effects (event=database_unhealthy) */
        uint64_t delay = db_wait_ms(c, ++s->db_waits);
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
        if (what & RETRY_RUN) slot_run(s);
    }
    arm_timer(p);
    update_pause(p);
}

/* ---- effects: one call per event (effects.h) ---- */

static void on_outcome(void *ud, const struct effects_outcome *o)
{
    struct slot *s = ud;
    switch (o->status) {
    case EFFECTS_DONE:
        s->run = NULL; /* the run is over */
        s->db_waits = 0;
        s->effects_done = true;
        slot_check(s);
        return;
    case EFFECTS_RETRY: /* another copy holds the e-mail claim: wait for its done mark */
        backoff(s, RETRY_RUN, db_wait_ms(s->p->c, ++s->db_waits));
        return;
    case EFFECTS_FAILED:
        slot_fail(s, RETRY_RUN, o->error_class, o->error_message, o->db_fault);
        return;
    }
}

/* Starts the effects of s, or resumes them from the failed step. */
static void slot_run(struct slot *s)
{
    struct consumer *c = s->p->c;
    int rc = s->run ? effects_resume(c->fx, s->run)
                    : effects_run(c->fx, &s->ev, on_outcome, s, &s->run);
    if (rc != 0) /* out of memory: waits like an unavailable database (no attempt) */
        slot_fail(s, RETRY_RUN, "db_unavailable", "effects: could not start", true);
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
    cons_close_progress(s->p->c);
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
            dlq_abandon(s);
            return;
        }
        dlq_wait(s);
        return;
    }
    if (!p->assigned) return; /* the poll reaps the zombie */
    log_warn("consumer", "event=dead_lettered partition=%" PRId32 " offset=%" PRId64
             " event_id=%s dlq_partition=%" PRId32 " dlq_offset=%" PRId64 " class=%s",
             p->partition, s->m->offset, s->poison ? "-" : s->ev.event_id, l->dlq_partition,
             l->dlq_offset, s->err_class);
    s->dlq = DLQ_DONE;
    slot_check(s);
}

/* ---- consumer events ---- */

static void on_message(struct consumer *c, rd_kafka_message_t *m)
{
    char qb[600];
    if (m->err) {
        if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET) cons_offset_reset(c, m);
        else if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
            log_warn("consumer", "event=consumer_error err=\"%s\" detail=%s",
                     rd_kafka_err2str(m->err), log_quoted(rd_kafka_message_errstr(m), qb, sizeof qb));
        rd_kafka_message_destroy(m);
        return;
    }
    struct cpart *p = cons_part_get(c, m->partition);
    if (!p || !p->assigned || c->phase != PH_RUNNING ||
        strcmp(rd_kafka_topic_name(m->rkt), c->cfg->topic) != 0 || m->offset <= p->last_seen) {
        rd_kafka_message_destroy(m); /* not ours (any more), or already queued */
        return;
    }
    struct slot *s = calloc(1, sizeof *s);
    if (!s) {
        /* Cannot hold it: rewind the partition to it so it is fetched again. */
        rd_kafka_topic_partition_list_t *l = cons_one_partition(c, m->partition, m->offset);
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
    if (!p->next_inactive) p->next_inactive = s;
    p->nslots++;
    p->last_seen = m->offset;
    inhand_add(c, 1);
    part_activate(p);
    update_pause(p);
}

void cons_rebalance(struct consumer *c, rd_kafka_resp_err_t err,
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
    if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS && !lost) cons_commit_now(c);
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
    cons_rebalance(opaque, err, partitions);
}

static void drain_consumer(struct consumer *c)
{
    rd_kafka_message_t *m;
    while (c->rk && c->phase < PH_STOPPING_IO && (m = rd_kafka_consumer_poll(c->rk, 0)))
        on_message(c, m);
}

static void on_consumer_ready(void *ud)
{
    struct consumer *c = ud;
    if (c->zombies) reap_zombies(c);
    drain_consumer(c);
}

static void on_poll_timer(uv_timer_t *t)
{
    on_consumer_ready(t->data);
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
    rd_kafka_conf_set_log_cb(conf, cons_kafka_log);
    return conf;
}

/* The drain bound of a dead member: its partitions move after session.timeout.ms
 * (CONSUMER_SESSION_TIMEOUT; heartbeats every third of it). With a group.instance.id
 * (CONSUMER_INSTANCE_ID) the member is static: a restart within the timeout takes its
 * partitions back without a cons_rebalance. KAFKA_CONFIG, applied first, is overridden only for
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

void cons_handle_closed(uv_handle_t *h)
{
    struct consumer *c = h->data;
    c->open_handles--;
    cons_close_progress(c);
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
    rc = -1;

    /* The dead-letter writer: its own producer, delivery reports served on the loop. */
    if (dlq_writer_create(&c->dlq, loop, cfg, brokers, c->db, on_dead_letter) != 0) goto fail;

    /* The consumer. auto.offset.reset=earliest, and every reset caused by an error is
     * reported (cons_kafka_log): see consumer.h. */
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
    rd_kafka_conf_set_offset_commit_cb(cconf, cons_offset_commit_cb);
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

    /* Last: once it exists, only effects_close frees it (its handles close on the loop). */
    if ((rc = effects_create(&c->fx, loop, cfg, cfg->consumer_group, c->db, c->hc)) != 0)
        goto fail;
    uv_timer_init(loop, &c->commit_timer);
    uv_timer_init(loop, &c->poll_timer);
    uv_timer_init(loop, &c->close_timer);
    c->commit_timer.data = c->poll_timer.data = c->close_timer.data = c;
    c->open_handles += 3;
    uv_timer_start(&c->poll_timer, on_poll_timer, POLL_INTERVAL_MS, POLL_INTERVAL_MS);

    cons_lag_watch(c);
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
    if (c->hc) hc_close(c->hc, NULL, NULL);
    if (c->db) dbp_close(c->db, NULL, NULL);
    free(c);
    return rc;
}

bool consumer_ready(const struct consumer *c)
{
    return c && c->ready && c->phase == PH_RUNNING;
}

