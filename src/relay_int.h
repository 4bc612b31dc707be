/* relay_int: the records the relay's files share (outbox_relay.c: claim, produce, record,
 * the lease hooks, start; relay_close.c: the shutdown sequence). Internal: callers use
 * outbox_relay.h. */
#ifndef TICKETD_RELAY_INT_H
#define TICKETD_RELAY_INT_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "db_pool.h"
#include "kafka_common.h"
#include "limits.h"
#include "relay_lease.h"
#include "relay_rows.h"
#include "relay_upkeep.h"

#define RELAY_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* A row's place in the claim order: (outbox.xid, outbox.id). */
struct relay_key {
    uint64_t xid;
    int64_t id;
};

static const struct relay_key KEY_MAX = {UINT64_MAX, INT64_MAX};

static inline int key_cmp(struct relay_key a, struct relay_key b)
{
    if (a.xid != b.xid) return a.xid < b.xid ? -1 : 1;
    return a.id < b.id ? -1 : a.id > b.id;
}

/* The key just below a row's: a cursor there reads the row again. */
static inline struct relay_key key_below(uint64_t xid, int64_t id)
{
    return (struct relay_key){xid, id - 1};
}

struct ack {
    int64_t id;
    int32_t partition;
    int64_t offset;
};

struct failure {
    int64_t id;
    char error[RELAY_ERR_MAX];
};

struct marked {
    int64_t id;
    uint64_t claim_seq; /* claims sent up to this one may not have seen the mark */
};

/* Delivery reports collected during one rd_kafka_poll drain. */
struct dr {
    int64_t id;
    rd_kafka_resp_err_t err;
    int32_t partition;
    int64_t offset;
};

struct relay {
    uv_loop_t *loop;
    const struct cfg *cfg;
    char *brokers; /* bootstrap, kept to recreate the producer after a fatal error */
    rd_kafka_t *rk;
    rd_kafka_resp_err_t last_produce_err; /* of the last failed produce call, for the log */
    rd_kafka_topic_t *rkt;  /* held so the topic's metadata and leaders are fetched early */
    rd_kafka_queue_t *mainq;
    struct kafka_bridge *bridge;
    struct dbp *session; /* LISTEN, lease, claims, backlog: short queries only */
    struct dbp *marker;  /* mark published / record failures / retention (may be slow) */
    uv_timer_t tick_timer, retry_timer, retention_timer, close_timer, lease_timer;

    struct relay_lease lease;
    int64_t claim_epoch;

    bool fatal, closing, teardown;
    bool kafka_up;   /* a broker is up now (statistics, delivery reports, errors) */
    bool kafka_seen; /* kafka_up was true at least once since start: readiness */
    uint64_t session_gen;     /* bumps on every (dis)connect: stale answers are ignored */
    bool claim_inflight, claim_again;
    struct relay_upkeep upkeep; /* retention, backlog gauges */
    uint64_t claim_gen;

    struct relay_key cursor;  /* claims read (xid, id) > cursor */
    struct relay_key rewind_to; /* pending rewind, applied when the next claim is sent */
    struct relay_key stored;  /* the durable cursor last stored (or read at acquisition) */
    bool cursor_inflight;
    uint64_t claim_seq_sent;  /* sequence number of the last claim sent */
    uint64_t claim_seq_inflight;

    struct relay_rows rows;
    int inflight;             /* rows in state INFLIGHT */

    struct ack *acks;         /* acknowledged, waiting for the mark UPDATE */
    size_t nacks, acks_cap, acks_sending;
    struct failure *fails;    /* failed deliveries, waiting for their UPDATE */
    size_t nfails, fails_cap, fails_sending;
    struct marked *marked;    /* FIFO of MARKED ids in claim_seq order */
    size_t nmarked, marked_cap;

    struct dr *drs;           /* scratch for one drain */
    size_t ndrs, drs_cap;

    uint64_t close_deadline;
    int closing_parts;        /* pools and handles still closing */
    void (*done)(void *ud);
    void *done_ud;
    uv_work_t destroy_work;
};

/* outbox_relay.c, for the shutdown sequence */
void relay_note_active(struct relay *r, bool active, const char *why);
void relay_flush_marks(struct relay *r);  /* acknowledged rows: their publication records */
void relay_flush_fails(struct relay *r);  /* failed tries: attempts and last_error */
void relay_store_cursor(struct relay *r); /* the durable cursor, fenced by the lease */
void relay_producer_retire(struct relay *r, uv_after_work_cb after);
void relay_free(struct relay *r);

/* relay_close.c: while closing, whenever something finished; tears down once nothing is
 * pending or the deadline passed. */
void relay_close_check(struct relay *r);

#endif
