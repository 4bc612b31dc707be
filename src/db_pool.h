/* db_pool (dbp_): a pool of nonblocking libpq connections driven by the loop.
 *
 * Each connection is a state machine (connecting -> idle -> busy -> idle | broken ->
 * backoff -> connecting) whose socket is watched with uv_poll_t; no libpq call that can
 * block is made (PQconnectStart/PQconnectPoll, PQsendQueryParams, PQconsumeInput,
 * PQisBusy, PQflush). Broken connections reconnect by themselves with capped backoff.
 * A pool of size 1 is a dedicated session (advisory locks, LISTEN). */
#ifndef TICKETD_DB_POOL_H
#define TICKETD_DB_POOL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "db_error.h"

struct dbp;

/* SQL text of a timestamptz column as RFC 3339 UTC with microseconds, the one format of every
 * time the service returns or publishes: DBP_RFC3339_UTC("created_at"). */
#define DBP_RFC3339_UTC(col) \
    "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* Called once per query. res is the result of the (last) statement: check
 * PQresultStatus() (a query error arrives as PGRES_FATAL_ERROR with error set too).
 * res is NULL when the query could not run or its outcome is unknown (connection lost,
 * pool closing); error then says why. res is owned by the pool and cleared after the
 * callback returns. */
typedef void (*dbp_result_fn)(void *ud, const PGresult *res, const char *error);

struct dbp_opts {
    const char *conninfo;
    int size;                        /* connections */
    const char *name;                /* for logs: "api", "relay", ... */
    int queue_max;                   /* queued queries beyond busy connections; 0 = 4096 */
    int read_conns;                  /* DBP_READ queries running at once; 0 = size / 2, >= 1 */
    int read_queue;                  /* DBP_READ queries queued; beyond it -EAGAIN (0 = none) */
    uint64_t reconnect_min_ms;       /* 0 = 100 */
    uint64_t reconnect_max_ms;       /* 0 = 5000 */
    /* optional hooks, called on the loop */
    void (*on_connect)(void *ud, struct dbp *pool);     /* a connection became ready */
    void (*on_disconnect)(void *ud, struct dbp *pool);  /* a ready connection broke */
    void (*on_notify)(void *ud, const char *channel, const char *payload);
    void *ud;
};

/* Creates the pool and starts connecting (asynchronously). Returns 0 or -errno. */
int dbp_create(struct dbp **out, uv_loop_t *loop, const struct dbp_opts *opts);

/* Sends sql with text parameters (copied; NULL entries are SQL NULL). cb runs later on the
 * loop, never from inside dbp_query. Returns 0 when queued; -ENOTCONN when no connection is
 * up (the DB is unreachable: callers answer 503), -EAGAIN when the queue is full; the
 * callback is then never called. */
int dbp_query(struct dbp *pool, const char *sql, int nparams, const char *const *params,
              dbp_result_fn cb, void *ud) __attribute__((warn_unused_result));

/* Query classes. Writes (dbp_query, dbp_query_prepared) take a freed connection first.
 * Reads (lookups any client can send) run on at most read_conns connections at once and
 * queue up to read_queue deep; beyond that dbp_query_class returns -EAGAIN at once (callers
 * answer 503 with Retry-After), so reads never starve group commit. */
enum dbp_class { DBP_WRITE, DBP_READ };
int dbp_query_class(struct dbp *pool, enum dbp_class cls, const char *sql, int nparams,
                    const char *const *params, dbp_result_fn cb, void *ud)
    __attribute__((warn_unused_result));

/* Connections ready to run a query (idle or busy). */
int dbp_connected(const struct dbp *pool);
/* Connections idle right now (group commit sends a batch only when one is). */
int dbp_idle(const struct dbp *pool);
/* Queries queued and not yet sent. */
int dbp_queued(const struct dbp *pool);

/* Closes every connection (queued and running queries get res NULL, "closing"), then calls
 * done(ud) on a later turn and frees the pool. */
void dbp_close(struct dbp *pool, void (*done)(void *ud), void *ud);

/* Prepared statements. Registers sql as a statement every connection prepares (PQsendPrepare, parameter types
 * inferred from the SQL, so cast them there: $1::text[]) the first time it runs it in a
 * session; after a reconnect it is prepared again. Returns the statement handle (>= 0) for
 * dbp_query_prepared, or -ENOSPC (at most 32 per pool) / -ENOMEM. */
int dbp_prepare(struct dbp *pool, const char *sql) __attribute__((warn_unused_result));

/* Like dbp_query, running a statement registered with dbp_prepare (about 2x cheaper for
 * PostgreSQL than parsing and planning it each time). A failed PREPARE arrives as the
 * query's error result. */
int dbp_query_prepared(struct dbp *pool, int stmt, int nparams, const char *const *params,
                       dbp_result_fn cb, void *ud) __attribute__((warn_unused_result));

#endif
