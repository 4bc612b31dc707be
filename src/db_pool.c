/* db_pool: nonblocking libpq connections on uv_poll_t, reconnecting by themselves.
 *
 * Each connection is a small state machine:
 *
 *   BACKOFF --timer--> [RESOLVING] --> CONNECTING --PQconnectPoll OK--> IDLE <--> BUSY
 *      ^                     |              |                             |        |
 *      +---- timer(0) ---- BROKEN <---------+------- error / EOF ---------+--------+
 *
 * RESOLVING: every host name of the conninfo is looked up first, off the loop (db_resolve.h);
 * every attempt resolves again (a failover may move the name).
 *
 * BROKEN is a one-turn state: the failure is noticed wherever it happens (possibly inside
 * dbp_query), the PGconn is finished at once, and a zero timer fails the running query and
 * schedules the reconnect on a later turn, so no callback ever runs inside dbp_query.
 * Idle connections sit on a list and queued queries on FIFOs, so dispatch is O(1). Two
 * classes: writes (the default) and reads (dbp_query_class DBP_READ: lookups any client can
 * ask for). A freed connection takes the next write first; reads hold at most read_conns
 * connections at once and wait in their own bounded queue, so a flood of reads can neither
 * take every connection nor delay group commit (ingest sends when a connection is idle).
 * The poll handle is allocated separately because the socket may change across reconnects
 * (and even during PQconnectPoll): the old handle is closed (freed in its close callback)
 * and a new one initialised on the new fd. */
#include "db_pool.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "db_resolve.h"
#include "limits.h"
#include "log.h"
#include "metrics.h"


enum dbc_state {
    DBC_BACKOFF,    /* no PGconn; timer runs until the next attempt */
    DBC_RESOLVING,  /* uv_getaddrinfo of host `resolving` in flight; timer is the timeout */
    DBC_CONNECTING, /* PQconnectPoll in progress; timer is the connect timeout */
    DBC_IDLE,       /* on pool->idle list */
    DBC_BUSY,       /* running c->q */
    DBC_BROKEN,     /* PGconn finished; timer(0) pending to fail c->q and back off */
    DBC_CLOSED,     /* pool closing */
};

struct dbp_query {
    struct dbp_query *next;
    dbp_result_fn cb;
    void *ud;
    const char *sql;      /* NULL for a prepared statement */
    bool read;            /* DBP_READ */
    bool running;         /* sent on a connection (counts in nreads_busy when read) */
    int stmt;             /* prepared statement index, or -1 */
    int nparams;
    const char **params;  /* points into the same allocation */
};

struct dbp_poll {
    uv_poll_t handle;     /* handle.data = the connection */
    struct dbp *pool;
};

struct dbp_conn {
    struct dbp *pool;
    int index;
    enum dbc_state state;
    PGconn *pg;
    unsigned gen;              /* bumped whenever pg changes: detects reentrant teardown */
    struct dbp_poll *poll;
    int poll_fd;
    int poll_events;
    uv_timer_t timer;
    struct dbp_query *q;       /* running query (BUSY; kept through BROKEN) */
    PGresult *res;             /* result kept for q */
    bool preparing;            /* q waits for the PREPARE of its statement */
    bool flushing;             /* PQflush returned 1: watch writable */
    bool was_ready;            /* reached IDLE since the last BROKEN (for logs) */
    bool recycled;             /* closed on purpose (read-only session): logged at debug */
    uint32_t prepared;         /* bit i: statement i prepared in this session */
    struct dbp_conn *idle_prev, *idle_next;
    uint64_t backoff_ms;
    int failures;              /* consecutive failed attempts (logs once, then debug) */
    int resolving;             /* index into pool->hosts.hosts */
    struct db_addrs addrs;     /* of the hosts resolved so far in this attempt */
    char reason[DBP_REASON_MAX];
};

struct dbp_stmt {
    char *sql;
    int nparams;
};

struct dbp {
    uv_loop_t *loop;
    char *conninfo;
    char *redacted;            /* conninfo with the password replaced, for logs */
    char *name;
    char *app_name;            /* application_name=ticketd-<name> */
    char *labels;              /* metrics labels: pool="<name>" */
    int size;
    int queue_max;
    struct db_hosts hosts;       /* host names to resolve (hosts.n = 0: none) */
    uint64_t reconnect_min_ms, reconnect_max_ms;
    void (*on_connect)(void *ud, struct dbp *pool);
    void (*on_disconnect)(void *ud, struct dbp *pool);
    void (*on_notify)(void *ud, const char *channel, const char *payload);
    void *ud;

    struct dbp_conn *conns;
    struct dbp_conn *idle_head;
    int nidle;
    int nconnected;
    struct dbp_query *qhead, *qtail;   /* writes */
    int nqueued;
    struct dbp_query *rhead, *rtail;   /* reads */
    int nrqueued;
    int read_conns, read_queue_max;    /* reads running at once, reads queued */
    int nreads_busy;
    struct dbp_stmt stmts[DBP_MAX_STATEMENTS];
    int nstmts;

    int handles;               /* open uv handles; the pool is freed when 0 after close */
    bool closing;
    struct dbp_query *failing; /* queries to fail with "closing" once handles are closed */
    void (*done)(void *ud);
    void *done_ud;
};

static void conn_start_connect(struct dbp_conn *c);
static void conn_send(struct dbp_conn *c, struct dbp_query *q);
static void conn_watch(struct dbp_conn *c, int events);

/* ---- small helpers ---- */

static void copy_reason(struct dbp_conn *c, const char *why)
{
    char line[DBP_REASON_MAX];
    size_t n = 0;
    /* libpq messages end with a newline and may hold several lines: keep them on one. */
    for (const char *p = why ? why : "unknown"; *p && n + 1 < sizeof line; p++)
        line[n++] = (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p;
    while (n > 0 && line[n - 1] == ' ') n--;
    line[n] = '\0';
    log_quote(line, c->reason, sizeof c->reason);
}

static void update_gauges(struct dbp *pool)
{
    metrics_gauge_set("ticketd_db_connections", pool->labels, pool->nconnected);
}

static void idle_push(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    c->idle_prev = NULL;
    c->idle_next = pool->idle_head;
    if (pool->idle_head) pool->idle_head->idle_prev = c;
    pool->idle_head = c;
    pool->nidle++;
}

static void idle_remove(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    if (c->idle_prev) c->idle_prev->idle_next = c->idle_next;
    else pool->idle_head = c->idle_next;
    if (c->idle_next) c->idle_next->idle_prev = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
    pool->nidle--;
}

static struct dbp_query *queue_pop(struct dbp *pool)
{
    struct dbp_query *q = pool->qhead;
    if (!q) return NULL;
    pool->qhead = q->next;
    if (!pool->qhead) pool->qtail = NULL;
    q->next = NULL;
    pool->nqueued--;
    return q;
}

static struct dbp_query *read_queue_pop(struct dbp *pool)
{
    struct dbp_query *q = pool->rhead;
    if (!q) return NULL;
    pool->rhead = q->next;
    if (!pool->rhead) pool->rtail = NULL;
    q->next = NULL;
    pool->nrqueued--;
    return q;
}

static bool read_may_run(const struct dbp *pool)
{
    return pool->nreads_busy < pool->read_conns;
}

static struct dbp_query *query_new(const char *sql, int stmt, int nparams,
                                   const char *const *params, dbp_result_fn cb, void *ud)
{
    size_t strings = sql ? strlen(sql) + 1 : 0;
    for (int i = 0; i < nparams; i++)
        if (params[i]) strings += strlen(params[i]) + 1;
    size_t head = sizeof(struct dbp_query) + (size_t)nparams * sizeof(char *);
    struct dbp_query *q = malloc(head + strings);
    if (!q) return NULL;
    q->next = NULL;
    q->cb = cb;
    q->ud = ud;
    q->read = q->running = false;
    q->stmt = stmt;
    q->nparams = nparams;
    q->params = (const char **)(q + 1);
    char *p = (char *)q + head;
    for (int i = 0; i < nparams; i++) {
        if (!params[i]) {
            q->params[i] = NULL;
            continue;
        }
        size_t len = strlen(params[i]) + 1;
        memcpy(p, params[i], len);
        q->params[i] = p;
        p += len;
    }
    q->sql = NULL;
    if (sql) {
        memcpy(p, sql, strlen(sql) + 1);
        q->sql = p;
    }
    return q;
}

/* Runs a query's callback and frees it. Returns false when the pool started closing
 * inside the callback (the caller must then stop touching connection state). */
static bool query_finish(struct dbp *pool, struct dbp_query *q, const PGresult *res,
                         const char *error)
{
    if (q->read && q->running) pool->nreads_busy--;
    q->cb(q->ud, res, error);
    free(q);
    return !pool->closing;
}

/* ---- handles ---- */

static void on_handle_closed_final(struct dbp *pool);

static void on_poll_closed(uv_handle_t *h)
{
    struct dbp_poll *p = (struct dbp_poll *)h;
    struct dbp *pool = p->pool;
    free(p);
    if (--pool->handles == 0 && pool->closing) on_handle_closed_final(pool);
}

static void on_timer_closed(uv_handle_t *h)
{
    struct dbp_conn *c = h->data;
    struct dbp *pool = c->pool;
    if (--pool->handles == 0 && pool->closing) on_handle_closed_final(pool);
}

/* Stops watching the socket. Must happen before PQfinish closes the fd. */
static void conn_poll_close(struct dbp_conn *c)
{
    if (!c->poll) return;
    uv_close((uv_handle_t *)&c->poll->handle, on_poll_closed);
    c->poll = NULL;
    c->poll_fd = -1;
    c->poll_events = 0;
}

/* ---- failure and reconnect ---- */

static void on_conn_timer(uv_timer_t *t);

/* Marks a connection broken: finishes the PGconn now (after closing its poll handle, which
 * must stop watching the fd before it is closed) and defers everything that calls back
 * (failing its query, hooks, reconnect) to a zero timer. Safe to call from anywhere,
 * including inside dbp_query. */
static void conn_broken(struct dbp_conn *c, const char *why)
{
    struct dbp *pool = c->pool;
    if (c->state == DBC_BROKEN || c->state == DBC_BACKOFF || c->state == DBC_CLOSED) return;
    if (c->state == DBC_IDLE) idle_remove(c);
    if (c->state == DBC_IDLE || c->state == DBC_BUSY) {
        pool->nconnected--;
        update_gauges(pool);
    }
    copy_reason(c, why);
    c->state = DBC_BROKEN;
    c->preparing = false;
    c->flushing = false;
    conn_poll_close(c);
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    c->gen++;
    uv_timer_start(&c->timer, on_conn_timer, 0, 0);
}

static uint64_t next_backoff(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    uint64_t delay = c->backoff_ms;
    c->backoff_ms = delay * 2 > pool->reconnect_max_ms ? pool->reconnect_max_ms : delay * 2;
    /* Jitter (50..100%) so a pool does not reconnect in lockstep after a restart. */
    return delay / 2 + (uint64_t)rand() % (delay / 2 + 1);
}

/* The deferred half of conn_broken, on a later turn: report, fail the running query (its
 * outcome is unknown: it may have committed), back off, and fail the queue when nothing is
 * connected any more (callers answer 503 rather than wait for a reconnect). */
static void conn_after_broken(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    bool was_ready = c->was_ready;
    c->was_ready = false;
    struct dbp_query *q = c->q;
    c->q = NULL;
    if (c->res) {
        PQclear(c->res);
        c->res = NULL;
    }
    if (was_ready) {
        c->failures = 0;
        c->backoff_ms = pool->reconnect_min_ms;
        log_at(c->recycled ? LOG_DEBUG : LOG_WARN, "db", "event=disconnected pool=%s conn=%d connected=%d error=%s", pool->name,
                 c->index, pool->nconnected, c->reason);
        metrics_counter_add("ticketd_db_disconnects_total", pool->labels, 1);
    } else if (c->failures++ == 0) {
        log_warn("db", "event=connect_failed pool=%s conn=%d target=%s error=%s", pool->name,
                 c->index, pool->redacted, c->reason);
    } else {
        log_debug("db", "event=connect_failed pool=%s conn=%d attempts=%d error=%s", pool->name,
                  c->index, c->failures, c->reason);
    }
    c->state = DBC_BACKOFF;
    uv_timer_start(&c->timer, on_conn_timer, next_backoff(c), 0);

    if (q && !query_finish(pool, q, NULL, "connection lost: outcome unknown")) return;
    if (was_ready && pool->on_disconnect) {
        pool->on_disconnect(pool->ud, pool);
        if (pool->closing) return;
    }
    if (pool->nconnected == 0) {
        struct dbp_query *queued;
        while ((queued = queue_pop(pool)) || (queued = read_queue_pop(pool)))
            if (!query_finish(pool, queued, NULL, "database unavailable")) return;
    }
}

/* ---- connecting ---- */

static void on_poll(uv_poll_t *h, int status, int events);

/* Watches the connection's current socket for events, (re)creating the poll handle when
 * there is none or the fd changed. */
static void conn_watch(struct dbp_conn *c, int events)
{
    struct dbp *pool = c->pool;
    int fd = PQsocket(c->pg);
    if (fd < 0) {
        conn_broken(c, "no socket");
        return;
    }
    if (c->poll && c->poll_fd != fd) conn_poll_close(c);
    if (!c->poll) {
        struct dbp_poll *p = malloc(sizeof *p);
        if (!p) {
            conn_broken(c, "out of memory");
            return;
        }
        int rc = uv_poll_init(pool->loop, &p->handle, fd);
        if (rc < 0) {
            free(p);
            conn_broken(c, uv_strerror(rc));
            return;
        }
        p->pool = pool;
        p->handle.data = c;
        pool->handles++;
        c->poll = p;
        c->poll_fd = fd;
        c->poll_events = 0;
    }
    if (events != c->poll_events) {
        int rc = uv_poll_start(&c->poll->handle, events, on_poll);
        if (rc < 0) {
            conn_broken(c, uv_strerror(rc));
            return;
        }
        c->poll_events = events;
    }
}

/* Gives an idle connection the next write, else the next read if reads may take one more;
 * then lets queued reads take other idle connections within their share. */
static void conn_dispatch(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    if (c->state == DBC_IDLE && pool->qhead) conn_send(c, queue_pop(pool));
    else if (c->state == DBC_IDLE && pool->rhead && read_may_run(pool))
        conn_send(c, read_queue_pop(pool));
    while (pool->rhead && pool->idle_head && read_may_run(pool) && !pool->qhead)
        conn_send(pool->idle_head, read_queue_pop(pool));
}

static void conn_ready(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    if (PQsetnonblocking(c->pg, 1) != 0) {
        conn_broken(c, PQerrorMessage(c->pg));
        return;
    }
    uv_timer_stop(&c->timer);
    c->state = DBC_IDLE;
    c->prepared = 0;
    c->was_ready = true;
    c->backoff_ms = pool->reconnect_min_ms;
    int failures = c->failures;
    c->failures = 0;
    pool->nconnected++;
    update_gauges(pool);
    log_at(c->recycled ? LOG_DEBUG : LOG_INFO, "db",
           "event=connected pool=%s conn=%d connected=%d failed_attempts=%d target=%s",
           pool->name, c->index, pool->nconnected, failures, pool->redacted);
    c->recycled = false;
    conn_watch(c, UV_READABLE);
    if (c->state != DBC_IDLE) return;
    idle_push(c);
    unsigned gen = c->gen;
    if (pool->on_connect) {
        pool->on_connect(pool->ud, pool);
        if (pool->closing || c->gen != gen) return;
    }
    conn_dispatch(c);
}

static void conn_connect_step(struct dbp_conn *c)
{
    /* libpq may switch sockets between steps (next address, SSL/GSS fallback), possibly
     * reusing the same fd number, so the poll handle is re-created at every step. */
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING:
        conn_poll_close(c);
        conn_watch(c, UV_READABLE);
        break;
    case PGRES_POLLING_WRITING:
        conn_poll_close(c);
        conn_watch(c, UV_WRITABLE);
        break;
    case PGRES_POLLING_OK:
        conn_ready(c);
        break;
    default:
        conn_broken(c, PQerrorMessage(c->pg));
        break;
    }
}

/* Server notices (and the FATAL a terminated session receives) go to the log, not stderr. */
static void on_notice(void *arg, const char *message)
{
    struct dbp_conn *c = arg;
    if (LOG_DEBUG < log_min_level) return;
    char line[DBP_REASON_MAX];
    size_t n = 0;
    for (const char *p = message; *p && n + 1 < sizeof line; p++)
        line[n++] = (*p == '\n' || *p == '\r') ? ' ' : *p;
    line[n] = '\0';
    char quoted[DBP_REASON_MAX + 8];
    log_quote(line, quoted, sizeof quoted);
    log_debug("db", "event=notice pool=%s conn=%d message=%s", c->pool->name, c->index, quoted);
}

/* ---- host names ---- */

static void conn_connect_now(struct dbp_conn *c);
static void resolve_next(struct dbp_conn *c);

static void on_resolved(void *ud, unsigned gen, int status, const char (*addrs)[DBP_ADDR_MAX],
                        int n)
{
    struct dbp_conn *c = ud;
    struct dbp *pool = c->pool;
    pool->handles--;
    if (pool->closing) {
        if (pool->handles == 0) on_handle_closed_final(pool);
        return;
    }
    if (c->gen != gen || c->state != DBC_RESOLVING) return; /* stale */
    if (n == 0) {
        char why[DBP_REASON_MAX];
        snprintf(why, sizeof why, "could not resolve host name \"%s\": %s",
                 pool->hosts.hosts[c->resolving], status ? uv_strerror(status) : "no address");
        conn_broken(c, why);
        return;
    }
    memcpy(c->addrs.addrs[c->resolving], addrs, (size_t)n * DBP_ADDR_MAX);
    c->addrs.naddrs[c->resolving] = n;
    c->resolving++;
    resolve_next(c);
}

/* Resolves the next host name of the list, or connects when all are done. */
static void resolve_next(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    while (c->resolving < pool->hosts.n && !pool->hosts.lookup[c->resolving])
        c->addrs.naddrs[c->resolving++] = 0;
    if (c->resolving >= pool->hosts.n) {
        conn_connect_now(c);
        return;
    }
    int rc = db_resolve(pool->loop, pool->hosts.hosts[c->resolving], on_resolved, c, c->gen);
    if (rc < 0) {
        conn_broken(c, uv_strerror(rc));
        return;
    }
    pool->handles++;
}

static void conn_start_connect(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    if (pool->hosts.n == 0) {
        conn_connect_now(c);
        return;
    }
    c->state = DBC_RESOLVING;
    c->gen++;
    c->resolving = 0;
    uv_timer_start(&c->timer, on_conn_timer, DBP_CONNECT_TIMEOUT_MS, 0);
    resolve_next(c);
}

static void conn_connect_now(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    /* Keywords before dbname are defaults the conninfo may override (libpq processes them
     * in order and expands dbname in place). Keepalives detect a dead peer while idle. */
    char host[DBP_HOSTS_MAX * DBP_ADDRS_PER_HOST * 256], hostaddr[sizeof host], port[1024];
    db_hosts_lists(&pool->hosts, &c->addrs, host, hostaddr, sizeof host, port, sizeof port);
    /* after dbname (which expands the conninfo in place), so these win */
    bool lists = pool->hosts.n > 0, ports = lists && pool->hosts.ports[0];
    const char *const keys[] = {"application_name", "keepalives", "keepalives_idle",
                                "keepalives_interval", "keepalives_count", "dbname",
                                lists ? "host" : NULL, "hostaddr", ports ? "port" : NULL, NULL};
    const char *const values[] = {pool->app_name, "1", "30", "10", "3", pool->conninfo,
                                  host, hostaddr, port, NULL};
    if (c->state != DBC_RESOLVING) c->gen++;
    c->state = DBC_CONNECTING;
    c->pg = PQconnectStartParams(keys, values, 1);
    if (!c->pg) {
        conn_broken(c, "out of memory");
        return;
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_broken(c, PQerrorMessage(c->pg));
        return;
    }
    PQsetNoticeProcessor(c->pg, on_notice, c);
    /* libpq does not time out a nonblocking connect by itself. */
    uv_timer_start(&c->timer, on_conn_timer, DBP_CONNECT_TIMEOUT_MS, 0);
    conn_watch(c, UV_WRITABLE); /* as if PQconnectPoll had said PGRES_POLLING_WRITING */
}

static void on_conn_timer(uv_timer_t *t)
{
    struct dbp_conn *c = t->data;
    switch (c->state) {
    case DBC_BROKEN: conn_after_broken(c); break;
    case DBC_BACKOFF: conn_start_connect(c); break;
    case DBC_RESOLVING: conn_broken(c, "host name resolution timed out"); break;
    case DBC_CONNECTING: conn_broken(c, "connect timeout"); break;
    default: break;
    }
}

/* ---- queries ---- */

static void stmt_name(int stmt, char *out, size_t outlen)
{
    snprintf(out, outlen, "dbp_%d", stmt);
}

static int conn_send_query(struct dbp_conn *c, const struct dbp_query *q)
{
    if (q->stmt >= 0) {
        char name[16];
        stmt_name(q->stmt, name, sizeof name);
        return PQsendQueryPrepared(c->pg, name, q->nparams, q->params, NULL, NULL, 0);
    }
    if (q->nparams == 0) return PQsendQuery(c->pg, q->sql); /* allows several statements */
    return PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, q->params, NULL, NULL, 0);
}

static void conn_flush(struct dbp_conn *c)
{
    int r = PQflush(c->pg);
    if (r < 0) {
        conn_broken(c, PQerrorMessage(c->pg));
        return;
    }
    c->flushing = r == 1;
    conn_watch(c, c->flushing ? UV_READABLE | UV_WRITABLE : UV_READABLE);
}

/* Starts q on an idle connection. Never calls back: a send failure breaks the connection
 * and q fails from the deferred broken handler. */
static void conn_send(struct dbp_conn *c, struct dbp_query *q)
{
    struct dbp *pool = c->pool;
    idle_remove(c);
    c->state = DBC_BUSY;
    c->q = q;
    q->running = true;
    if (q->read) pool->nreads_busy++;
    int ok;
    if (q->stmt >= 0 && !(c->prepared & (1u << q->stmt))) {
        char name[16];
        stmt_name(q->stmt, name, sizeof name);
        c->preparing = true;
        ok = PQsendPrepare(c->pg, name, pool->stmts[q->stmt].sql, 0, NULL);
    } else {
        ok = conn_send_query(c, q);
    }
    if (!ok) {
        conn_broken(c, PQerrorMessage(c->pg));
        return;
    }
    conn_flush(c);
}

/* The running command finished (PQgetResult gave NULL). */
static void conn_command_done(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    if (PQstatus(c->pg) == CONNECTION_BAD) { /* lost mid-query: outcome unknown */
        conn_broken(c, PQerrorMessage(c->pg));
        return;
    }
    struct dbp_query *q = c->q;
    PGresult *res = c->res;
    c->res = NULL;
    if (c->preparing) {
        c->preparing = false;
        if (res && PQresultStatus(res) == PGRES_COMMAND_OK) {
            PQclear(res);
            c->prepared |= 1u << q->stmt;
            if (!conn_send_query(c, q)) {
                conn_broken(c, PQerrorMessage(c->pg));
                return;
            }
            conn_flush(c);
            return;
        }
        /* the PREPARE failed: the query gets its error result */
    }
    c->q = NULL;
    c->state = DBC_IDLE;
    idle_push(c);
    const char *error = NULL;
    if (!res) {
        error = "no result";
    } else {
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE || st == PGRES_NONFATAL_ERROR)
            error = PQresultErrorMessage(res);
    }
    unsigned gen = c->gen;
    bool recycle = error && dbp_error_read_only(res);
    bool alive = query_finish(pool, q, res, error);
    PQclear(res);
    if (!alive || c->gen != gen) return;
    if (recycle) {
        c->recycled = true;
        conn_broken(c, "the session is read-only: reconnecting");
    }
    else conn_dispatch(c);
}

static void conn_read_results(struct dbp_conn *c)
{
    PGconn *pg = c->pg;
    while (!PQisBusy(pg)) {
        PGresult *r = PQgetResult(pg);
        if (!r) {
            conn_command_done(c);
            return;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            PQclear(r);
            conn_broken(c, "COPY is not supported by db_pool");
            return;
        }
        /* Keep the last result, but an error wins over a later one. */
        if (c->res && PQresultStatus(c->res) == PGRES_FATAL_ERROR) {
            PQclear(r);
        } else {
            PQclear(c->res);
            c->res = r;
        }
    }
    if (PQstatus(pg) == CONNECTION_BAD) conn_broken(c, PQerrorMessage(pg));
}

static void conn_notifies(struct dbp_conn *c)
{
    struct dbp *pool = c->pool;
    unsigned gen = c->gen;
    PGnotify *n;
    while (c->gen == gen && (n = PQnotifies(c->pg)) != NULL) {
        if (pool->on_notify) pool->on_notify(pool->ud, n->relname, n->extra);
        PQfreemem(n);
        if (pool->closing) return;
    }
}

static void conn_io(struct dbp_conn *c, int events)
{
    struct dbp *pool = c->pool;
    unsigned gen = c->gen;
    if (events & UV_READABLE) {
        if (!PQconsumeInput(c->pg) || PQstatus(c->pg) == CONNECTION_BAD) {
            conn_broken(c, PQerrorMessage(c->pg));
            return;
        }
    }
    if (c->flushing) {
        conn_flush(c);
        if (c->gen != gen) return;
    }
    if (c->state == DBC_BUSY && !c->flushing) {
        conn_read_results(c);
        if (pool->closing || c->gen != gen) return;
    }
    conn_notifies(c);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct dbp_conn *c = h->data;
    if (!c->poll || &c->poll->handle != h) return; /* a handle being replaced */
    if (status < 0) {
        /* libuv reports POLLERR as UV_EBADF; libpq can usually say what happened. */
        if (c->state != DBC_CONNECTING && !PQconsumeInput(c->pg))
            conn_broken(c, PQerrorMessage(c->pg));
        else
            conn_broken(c, uv_strerror(status));
        return;
    }
    if (c->state == DBC_CONNECTING) conn_connect_step(c);
    else if (c->state == DBC_IDLE || c->state == DBC_BUSY) conn_io(c, events);
}

/* ---- public API ---- */

static void pool_free(struct dbp *pool)
{
    for (int i = 0; i < pool->nstmts; i++) free(pool->stmts[i].sql);
    db_hosts_free(&pool->hosts);
    free(pool->conninfo);
    free(pool->redacted);
    free(pool->name);
    free(pool->app_name);
    free(pool->labels);
    free(pool->conns);
    free(pool);
}

int dbp_create(struct dbp **out, uv_loop_t *loop, const struct dbp_opts *opts)
{
    if (!out || !loop || !opts || !opts->conninfo || opts->size < 1 || opts->size > 1024)
        return -EINVAL;
    struct dbp *pool = calloc(1, sizeof *pool);
    if (!pool) return -ENOMEM;
    const char *name = opts->name ? opts->name : "db";
    pool->loop = loop;
    pool->conninfo = strdup(opts->conninfo);
    pool->redacted = cfg_redact_url(opts->conninfo);
    pool->name = strdup(name);
    pool->conns = calloc((size_t)opts->size, sizeof *pool->conns);
    size_t applen = strlen(name) + 16, lablen = strlen(name) + 16;
    pool->app_name = malloc(applen);
    pool->labels = malloc(lablen);
    if (!pool->conninfo || !pool->redacted || !pool->name || !pool->conns || !pool->app_name ||
        !pool->labels) {
        pool_free(pool);
        return -ENOMEM;
    }
    snprintf(pool->app_name, applen, "ticketd-%s", name);
    snprintf(pool->labels, lablen, "pool=\"%s\"", name);
    pool->size = opts->size;
    pool->queue_max = opts->queue_max > 0 ? opts->queue_max : DBP_DEFAULT_QUEUE_MAX;
    pool->read_conns = opts->read_conns > 0 ? opts->read_conns : opts->size / 2;
    if (pool->read_conns < 1) pool->read_conns = 1;
    if (pool->read_conns > opts->size) pool->read_conns = opts->size;
    pool->read_queue_max = opts->read_queue > 0 ? opts->read_queue : 0;
    pool->reconnect_min_ms = opts->reconnect_min_ms ? opts->reconnect_min_ms : 100;
    pool->reconnect_max_ms = opts->reconnect_max_ms ? opts->reconnect_max_ms : 5000;
    if (pool->reconnect_max_ms < pool->reconnect_min_ms)
        pool->reconnect_max_ms = pool->reconnect_min_ms;
    db_hosts_parse(&pool->hosts, pool->conninfo);
    pool->on_connect = opts->on_connect;
    pool->on_disconnect = opts->on_disconnect;
    pool->on_notify = opts->on_notify;
    pool->ud = opts->ud;

    metrics_describe("ticketd_db_connections", "gauge", "PostgreSQL connections ready, per pool");
    metrics_describe("ticketd_db_disconnects_total", "counter",
                     "Ready PostgreSQL connections that broke, per pool");
    update_gauges(pool);
    log_info("db", "event=pool_start pool=%s size=%d target=%s", pool->name, pool->size,
             pool->redacted);

    for (int i = 0; i < pool->size; i++) {
        struct dbp_conn *c = &pool->conns[i];
        c->pool = pool;
        c->index = i;
        c->state = DBC_BACKOFF;
        c->poll_fd = -1;
        c->backoff_ms = pool->reconnect_min_ms;
        uv_timer_init(loop, &c->timer);
        c->timer.data = c;
        pool->handles++;
    }
    for (int i = 0; i < pool->size; i++) conn_start_connect(&pool->conns[i]);
    *out = pool;
    return 0;
}

static int submit(struct dbp *pool, struct dbp_query *q)
{
    if (q->read) {
        if (pool->idle_head && read_may_run(pool)) {
            conn_send(pool->idle_head, q);
        } else {
            if (pool->rtail) pool->rtail->next = q;
            else pool->rhead = q;
            pool->rtail = q;
            pool->nrqueued++;
        }
        return 0;
    }
    if (pool->idle_head) {
        conn_send(pool->idle_head, q);
    } else {
        if (pool->qtail) pool->qtail->next = q;
        else pool->qhead = q;
        pool->qtail = q;
        pool->nqueued++;
    }
    return 0;
}

static int admit(const struct dbp *pool, enum dbp_class cls, int nparams,
                 const char *const *params)
{
    if (nparams < 0 || (nparams > 0 && !params)) return -EINVAL;
    if (pool->closing || pool->nconnected == 0) return -ENOTCONN;
    if (cls == DBP_READ)
        return (pool->idle_head && read_may_run(pool)) || pool->nrqueued < pool->read_queue_max
                   ? 0 : -EAGAIN;
    if (!pool->idle_head && pool->nqueued >= pool->queue_max) return -EAGAIN;
    return 0;
}

int dbp_query_class(struct dbp *pool, enum dbp_class cls, const char *sql, int nparams,
                    const char *const *params, dbp_result_fn cb, void *ud)
{
    if (!sql || !cb) return -EINVAL;
    int rc = admit(pool, cls, nparams, params);
    if (rc < 0) return rc;
    struct dbp_query *q = query_new(sql, -1, nparams, params, cb, ud);
    if (!q) return -ENOMEM;
    q->read = cls == DBP_READ;
    return submit(pool, q);
}

int dbp_query(struct dbp *pool, const char *sql, int nparams, const char *const *params,
              dbp_result_fn cb, void *ud)
{
    return dbp_query_class(pool, DBP_WRITE, sql, nparams, params, cb, ud);
}

int dbp_prepare(struct dbp *pool, const char *sql)
{
    if (!sql) return -EINVAL;
    for (int i = 0; i < pool->nstmts; i++)
        if (strcmp(pool->stmts[i].sql, sql) == 0) return i;
    if (pool->nstmts >= DBP_MAX_STATEMENTS) return -ENOSPC;
    char *copy = strdup(sql);
    if (!copy) return -ENOMEM;
    pool->stmts[pool->nstmts].sql = copy;
    return pool->nstmts++;
}

int dbp_query_prepared(struct dbp *pool, int stmt, int nparams, const char *const *params,
                       dbp_result_fn cb, void *ud)
{
    if (stmt < 0 || stmt >= pool->nstmts || !cb) return -EINVAL;
    int rc = admit(pool, DBP_WRITE, nparams, params);
    if (rc < 0) return rc;
    struct dbp_query *q = query_new(NULL, stmt, nparams, params, cb, ud);
    if (!q) return -ENOMEM;
    return submit(pool, q);
}

int dbp_connected(const struct dbp *pool)
{
    return pool->nconnected;
}

int dbp_idle(const struct dbp *pool)
{
    return pool->nidle;
}

int dbp_queued(const struct dbp *pool)
{
    return pool->nqueued + pool->nrqueued;
}

static void on_handle_closed_final(struct dbp *pool)
{
    struct dbp_query *q;
    while ((q = pool->failing)) {
        pool->failing = q->next;
        q->cb(q->ud, NULL, "closing");
        free(q);
    }
    log_info("db", "event=pool_closed pool=%s", pool->name);
    if (pool->done) pool->done(pool->done_ud);
    pool_free(pool);
}

void dbp_close(struct dbp *pool, void (*done)(void *ud), void *ud)
{
    if (!pool || pool->closing) return;
    pool->closing = true;
    pool->done = done;
    pool->done_ud = ud;
    struct dbp_query *fail = NULL, **tail = &fail;
    for (int i = 0; i < pool->size; i++) {
        struct dbp_conn *c = &pool->conns[i];
        if (c->q) { /* running: its outcome is unknown */
            *tail = c->q;
            tail = &c->q->next;
            c->q->next = NULL;
            c->q = NULL;
        }
        if (c->res) {
            PQclear(c->res);
            c->res = NULL;
        }
        conn_poll_close(c);
        if (c->pg) {
            PQfinish(c->pg);
            c->pg = NULL;
        }
        c->gen++;
        c->state = DBC_CLOSED;
        uv_close((uv_handle_t *)&c->timer, on_timer_closed);
    }
    *tail = pool->qhead;
    while (*tail) tail = &(*tail)->next;
    *tail = pool->rhead;
    pool->qhead = pool->qtail = pool->rhead = pool->rtail = NULL;
    pool->nqueued = pool->nrqueued = pool->nreads_busy = 0;
    pool->failing = fail;
    pool->idle_head = NULL;
    pool->nidle = 0;
    pool->nconnected = 0;
    update_gauges(pool);
    log_info("db", "event=pool_closing pool=%s", pool->name);
}
