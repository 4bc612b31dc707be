/* consumer_close: the consumer's graceful stop (consumer_close in consumer.h): drain the
 * work in flight (bounded), close effects, the HTTP client and the pool, commit what
 * finished, close the group consumer asynchronously, destroy rdkafka off the loop. */
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdlib.h>

#include "consumer.h"
#include "consumer_int.h"
#include "db_pool.h"
#include "http_client.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"

/* ---- close ---- */

/* Statements, calls and DLQ deliveries in flight, plus done marks still to write (they
 * spare the next owner a repeated call). */
static unsigned in_flight(const struct consumer *c)
{
    unsigned n = c->fx ? effects_inflight(c->fx) : 0;
    return n + dlq_writer_inflight(c->dlq);
}

static void on_db_closed(void *ud);

static void stop_io(struct consumer *c)
{
    c->phase = PH_STOPPING_IO;
    uv_timer_stop(&c->close_timer);
    uv_timer_stop(&c->poll_timer);
    log_info("consumer", "event=closing_io in_flight=%u", in_flight(c));
    /* Runs still in flight (deadline passed) end now with "closing": not finished, not
     * committed, re-delivered to the next owner. */
    effects_stop(c->fx);
    hc_close(c->hc, NULL, NULL);
    c->hc = NULL;
    dbp_close(c->db, on_db_closed, c);
}

static void on_drain_poll(uv_timer_t *t)
{
    cons_close_progress(t->data);
}

static void on_close_deadline(uv_timer_t *t)
{
    struct consumer *c = t->data;
    if (c->phase == PH_DRAINING) {
        log_warn("consumer", "event=close_drain_timeout in_flight=%u", in_flight(c));
        stop_io(c);
    } else if (c->phase == PH_KAFKA_CLOSING) {
        log_warn("consumer", "event=close_timeout action=destroy");
        cons_close_progress(c);
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
    uv_close((uv_handle_t *)&c->commit_timer, cons_handle_closed);
    uv_close((uv_handle_t *)&c->poll_timer, cons_handle_closed);
    uv_close((uv_handle_t *)&c->close_timer, cons_handle_closed);
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
    /* Messages hold references into rd_kafka_t: every one is gone before the destroy. */
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (!p) continue;
        c->parts[i] = NULL;
        p->assigned = false;
        cons_part_free(p);
    }
    while (c->zombies) {
        struct cpart *p = c->zombies;
        c->zombies = p->next_zombie;
        cons_part_free(p);
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
            cons_rebalance(c, rd_kafka_event_error(ev), rd_kafka_event_topic_partition_list(ev));
            break;
        case RD_KAFKA_EVENT_OFFSET_COMMIT:
            cons_commit_result(c, rd_kafka_event_error(ev), rd_kafka_event_topic_partition_list(ev));
            break;
        case RD_KAFKA_EVENT_ERROR:
            log_warn("consumer", "event=close_error err=\"%s\"", rd_kafka_event_error_string(ev));
            break;
        default:
            break;
        }
        rd_kafka_event_destroy(ev);
    }
    cons_close_progress(c);
}

static void on_close_poll_timer(uv_timer_t *t)
{
    on_close_queue_ready(t->data);
}

static void on_effects_closed(void *ud);

static void on_db_closed(void *ud)
{
    struct consumer *c = ud;
    c->db = NULL;
    effects_close(c->fx, on_effects_closed, c);
}

static void on_effects_closed(void *ud)
{
    struct consumer *c = ud;
    c->fx = NULL;

    /* Every run has ended. Commit what finished, stop the DLQ producer's reports, drop the
     * messages nobody will handle, then close the consumer asynchronously. */
    c->phase = PH_KAFKA_CLOSING;
    cons_commit_now(c);
    uv_timer_stop(&c->commit_timer);
    c->commit_scheduled = false;
    dlq_writer_stop(c->dlq);
    for (int32_t i = 0; i < c->nparts; i++)
        if (c->parts[i]) cons_part_drop_slots(c->parts[i]);
    while (c->zombies) {
        struct cpart *p = c->zombies;
        c->zombies = p->next_zombie;
        cons_part_free(p);
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

void cons_close_progress(struct consumer *c)
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
            cons_lag_unwatch(c);
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
    effects_drain(c->fx);
    /* what effects write meanwhile (done marks) reports nothing: look every CONSUMER_DRAIN_POLL_MS */
    uv_timer_start(&c->poll_timer, on_drain_poll, CONSUMER_DRAIN_POLL_MS, CONSUMER_DRAIN_POLL_MS);
    /* Events waiting for a retry, or not handed out yet, stay unfinished (re-delivered to
     * the next owner); what is in flight may finish, and its done marks are written. */
    for (int32_t i = 0; i < c->nparts; i++)
        if (c->parts[i]) uv_timer_stop(&c->parts[i]->timer);
    int64_t grace = c->cfg->shutdown_grace_ms;
    if (grace <= 0 || grace > CLOSE_DRAIN_MAX_MS) grace = CLOSE_DRAIN_MAX_MS;
    log_info("consumer", "event=closing in_flight=%u", in_flight(c));
    uv_timer_start(&c->close_timer, on_close_deadline, (uint64_t)grace, 0);
    cons_close_progress(c);
}
