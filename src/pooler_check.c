/* pooler_check: are our PostgreSQL sessions our own? (see pooler_check.h) */
#include "pooler_check.h"

#include <errno.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"

static PGconn *open_session(const char *conninfo)
{
    const char *const keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *const values[] = {"10", "ticketd-pooler-check", conninfo, NULL};
    PGconn *pg = PQconnectdbParams(keys, values, 1);
    if (pg && PQstatus(pg) == CONNECTION_OK) return pg;
    char q[600];
    log_quote(pg ? PQerrorMessage(pg) : "out of memory", q, sizeof q);
    log_warn("pooler_check", "event=skipped why=connect_failed error=%s", q);
    PQfinish(pg);
    return NULL;
}

/* pg_backend_pid() of the server session answering this query; -1 on error. */
static long backend_pid(PGconn *pg)
{
    PGresult *r = PQexec(pg, "SELECT pg_backend_pid()");
    long pid = -1;
    if (r && PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
        pid = strtol(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    return pid;
}

int pooler_check(const char *conninfo, char *err, size_t errlen)
{
    PGconn *a = open_session(conninfo);
    PGconn *b = a ? open_session(conninfo) : NULL;
    long first = -1, second = -1, third = -1;
    if (b) {
        first = backend_pid(a);
        second = backend_pid(b); /* a is idle: a transaction pooler reuses its backend */
        third = backend_pid(a);  /* and back */
    }
    PQfinish(a);
    PQfinish(b);
    if (!b) return 0;
    if (first < 0 || second < 0 || third < 0) {
        log_warn("pooler_check", "event=skipped why=query_failed");
        return 0;
    }
    if (first == second || second == third) {
        snprintf(err, errlen,
                 "two client sessions were served by the same PostgreSQL backend (pid %ld): "
                 "DATABASE_URL leads to a pooler in transaction or statement mode (PgBouncer "
                 "pool_mode = transaction). ticketd needs session pooling or a direct "
                 "connection: the relay LISTENs for outbox notifications and holds a "
                 "session-level lock, and every connection PREPAREs its statements once; "
                 "none of that survives a server connection shared between clients. Set "
                 "pool_mode = session for this database in pgbouncer.ini",
                 second);
        return -EPROTO;
    }
    log_info("pooler_check", "event=sessions_private pids=%ld,%ld", first, second);
    return 0;
}
