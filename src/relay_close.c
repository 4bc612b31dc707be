/* relay_close: the relay's shutdown sequence. Nothing new is claimed; acknowledged rows
 * get their records, the cursor is stored and the lease handed back (so a standby need not
 * wait for the TTL), then the producer, timers and pools close; at the deadline what is
 * left is abandoned (those rows stay unpublished and are sent again by the next leader). */
#include "outbox_relay.h"

#include <inttypes.h>
#include <librdkafka/rdkafka.h>

#include "log.h"
#include "relay_int.h"

#define RELAY_CLOSE_CHECK_MS 50

static void part_closed(struct relay *r)
{
    if (--r->closing_parts > 0) return;
    void (*done)(void *) = r->done;
    void *ud = r->done_ud;
    log_info("relay", "event=closed");
    relay_free(r);
    if (done) done(ud);
}

static void on_pool_closed(void *ud)
{
    part_closed(ud);
}

static void on_timer_closed(uv_handle_t *h)
{
    part_closed(h->data);
}

static void on_final_destroy(uv_work_t *w, int status)
{
    struct relay *r = RELAY_CONTAINER_OF(w, struct relay, destroy_work);
    (void)status;
    part_closed(r);
}

/* Runs while closing, whenever something finished: tears down once nothing is pending
 * or the deadline passed. */
void relay_close_check(struct relay *r)
{
    if (r->teardown) return;
    if (r->closing_parts > 0) return; /* a producer is being destroyed: its work holds r */
    bool idle = r->inflight == 0 && r->nacks == 0 && r->nfails == 0 && !r->acks_sending &&
                !r->fails_sending && !r->claim_inflight && !r->cursor_inflight;
    bool late = uv_now(r->loop) >= r->close_deadline;
    if (!idle && !late) return;
    if (!late && r->lease.held && !r->lease.released) {
        relay_store_cursor(r); /* the successor starts exactly where this one stopped */
        if (r->cursor_inflight) return;
        /* Hand the lease back so that a standby need not wait for the TTL. */
        if (!r->lease.release_inflight) relay_lease_release(&r->lease, r->session);
        if (r->lease.release_inflight) return;
    }
    if (!idle)
        log_warn("relay", "event=close_deadline inflight=%d unmarked=%zu action=abandon "
                 "note=\"rows stay unpublished and are sent again\"",
                 r->inflight, r->nacks);
    r->teardown = true;
    r->lease.stopped = true;
    if (r->lease.held) {
        r->lease.held = false;
        relay_note_active(r, false, "shutdown");
    }

    r->closing_parts = 1; /* held until every part below is started */
    if (r->rk) {
        rd_kafka_purge(r->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        relay_producer_retire(r, on_final_destroy);
    }
    uv_timer_t *timers[] = {&r->tick_timer, &r->retry_timer, &r->retention_timer, &r->close_timer,
                            &r->lease_timer};
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) {
        r->closing_parts++;
        uv_close((uv_handle_t *)timers[i], on_timer_closed);
    }
    r->closing_parts += 2;
    dbp_close(r->session, on_pool_closed, r); /* closing the session releases the lock */
    dbp_close(r->marker, on_pool_closed, r);
    part_closed(r);
}

static void on_close_timer(uv_timer_t *t)
{
    relay_close_check(t->data);
}

void relay_close(struct relay *r, void (*done)(void *ud), void *ud)
{
    if (!r || r->closing) return;
    r->closing = true;
    r->lease.closing = true;
    r->done = done;
    r->done_ud = ud;
    uv_timer_stop(&r->tick_timer);
    uv_timer_stop(&r->retry_timer);
    uv_timer_stop(&r->retention_timer);
    int64_t wait = r->cfg->shutdown_grace_ms;
    if (wait > RELAY_CLOSE_WAIT_MAX_MS || wait <= 0) wait = RELAY_CLOSE_WAIT_MAX_MS;
    r->close_deadline = uv_now(r->loop) + (uint64_t)wait;
    log_info("relay", "event=closing inflight=%d unmarked=%zu wait_ms=%" PRId64, r->inflight,
             r->nacks, wait);
    uv_timer_start(&r->close_timer, on_close_timer, RELAY_CLOSE_CHECK_MS, RELAY_CLOSE_CHECK_MS);
    /* Nothing new is claimed; acks already collected are marked now. */
    relay_flush_marks(r);
    relay_flush_fails(r);
}
