/* relay_rows: the outbox relay's rows in hand. A hash map sized to a power of two; pointers
 * into it are valid until the next insert.
 *
 * Every outbox row this process is handling sits in one map, keyed by row id, in one
 * state:
 *   INFLIGHT  produced, delivery report not yet seen
 *   ACKED     acknowledged by the broker, its publication record not yet committed
 *   MARKED    recorded published while a claim was in flight: that claim may have read
 *             the row before the record committed; dropped when that claim returns
 *   COOLDOWN  its delivery failed; skipped by claims until its retry time
 * Claims skip every id in the map, so a row is never produced twice concurrently. The rows
 * not yet marked are bounded by RELAY_INFLIGHT_MAX. MARKED rows are not counted: they only
 * wait for the claim in flight, and a full map must never keep the next claim from being
 * sent (that claim is what lets MARKED rows go). */
#ifndef TICKETD_RELAY_ROWS_H
#define TICKETD_RELAY_ROWS_H

#include <stddef.h>
#include <stdint.h>

enum row_state { ROW_INFLIGHT = 1, ROW_ACKED, ROW_MARKED, ROW_COOLDOWN };

struct row {
    int64_t id; /* 0 = empty slot */
    uint64_t xid;        /* outbox.xid: with id, the row's place in the claim order */
    uint8_t state;
    int attempts;        /* as read by the claim (before this try) */
    double created_at;   /* epoch seconds, for commit -> ack latency */
    uint64_t retry_at;   /* COOLDOWN: loop ms */
};

struct relay_rows {
    struct row *slots;
    size_t cap; /* power of two */
    size_t count;
};

/* The row of id, or NULL. */
struct row *relay_rows_find(struct relay_rows *m, int64_t id);

/* The row of id, zeroed when new; NULL when out of memory. */
struct row *relay_rows_insert(struct relay_rows *m, int64_t id);

void relay_rows_remove(struct relay_rows *m, int64_t id);

/* Forgets every row (the memory is kept). */
void relay_rows_clear(struct relay_rows *m);

/* Grows *arr (of elem-sized items, *cap of them) to hold need; doubling. 0 or -ENOMEM. */
int relay_grow(void **arr, size_t *cap, size_t need, size_t elem);

#endif
