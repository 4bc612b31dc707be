/* ingest: group commit of applications.
 *
 * Applications submitted during one loop iteration are written, after the poll phase (a
 * uv_check handle), by one statement in one transaction: unnest() arrays feed a CTE that
 * inserts the applications (skipping existing (event_id, phone)), inserts one outbox row
 * per new application, and returns one row per input. At most BATCH_MAX applications per
 * statement; a batch is sent only when a pool connection is idle, so under load batches
 * grow instead of queries queuing. Each submitter still gets its own result. */
#ifndef TICKETD_INGEST_H
#define TICKETD_INGEST_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "db_pool.h"
#include "validate.h"

enum ingest_status {
    INGEST_CREATED = 0,   /* committed with its outbox row: 201 */
    INGEST_REPLAYED,      /* same (event_id, phone) and same Idempotency-Key: the original 201 */
    INGEST_DUPLICATE,     /* (event_id, phone) exists: 409, without its reference */
    INGEST_UNAVAILABLE,   /* DB down or the commit's outcome unknown: 503 */
    INGEST_OVERLOADED,    /* pending queue full: 503 at once */
    INGEST_KEY_MISMATCH,  /* Idempotency-Key stored with another body's fingerprint: 422 */
    INGEST_KEY_IN_FLIGHT, /* Idempotency-Key of a request still queued or in a batch: 409 */
    INGEST_NSTATUS
};

struct ingest_result {
    enum ingest_status status;
    int64_t id;              /* application id (CREATED, REPLAYED, DUPLICATE) */
    char created_at[40];     /* RFC 3339 UTC, CREATED and REPLAYED */
    char reference[40];      /* the application's UUID, CREATED and REPLAYED */
    const char *error;       /* UNAVAILABLE: why, for logs */
    int retry_after_s;       /* OVERLOADED: jittered Retry-After (1..3 s); 0 = not given */
};

typedef void (*ingest_done_fn)(void *ud, const struct ingest_result *res);

struct ingest_opts {
    int batch_max;           /* >= 1 */
    int queue_max;           /* pending applications (queued + in flight) */
    int64_t key_ttl_ms;      /* Idempotency-Keys older than this are pruned; 0 = never */
    uint64_t queue_wait_max_ms; /* admission by time: refuse while the oldest queued
                                 * application has waited longer; 0 = off */
};

struct ingest;

int ingest_create(struct ingest **out, uv_loop_t *loop, struct dbp *db,
                  const struct ingest_opts *opts);

/* Queues one application (copied). idempotency_key (may be NULL) is stored with the
 * application's fingerprint; a later submission with the same key replays (same body) or
 * gets KEY_MISMATCH, one while the first is still queued or in flight gets KEY_IN_FLIGHT.
 * done runs exactly once, on a later loop turn for CREATED/REPLAYED/DUPLICATE/KEY_MISMATCH/
 * UNAVAILABLE; OVERLOADED, KEY_IN_FLIGHT and UNAVAILABLE-because-down may be reported
 * before ingest_submit returns. */
void ingest_submit(struct ingest *ing, const struct application_in *app,
                   const char *idempotency_key, ingest_done_fn done, void *ud);

size_t ingest_pending(const struct ingest *ing);

/* Stops the check handle; pending submissions get UNAVAILABLE. Frees on a later turn. */
void ingest_close(struct ingest *ing);

/* The SQL of the schema lives in migrate.c; this is the statement group commit uses
 * (exposed for tests). */
extern const char *const ingest_batch_sql;
/* Clears expired Idempotency-Keys of up to one id range: $1 cursor id, $2 TTL in ms. */
extern const char *const ingest_prune_sql;

#endif
