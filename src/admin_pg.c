/* admin_pg: see admin_pg.h. */
#include "admin_pg.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin_common.h"

void admin_pg_first_line(const char *msg, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s", msg ? msg : "unknown error");
    char *nl = strchr(out, '\n');
    if (nl) *nl = '\0';
}

PGconn *admin_pg_connect(const struct cfg *cfg, const char *application_name, char *err,
                         size_t errlen)
{
    /* Keywords before dbname are overridden by the expanded URL's own settings. */
    const char *keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *vals[] = {"10", application_name, cfg->database_url, NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        char msg[256];
        admin_pg_first_line(c ? PQerrorMessage(c) : "out of memory", msg, sizeof msg);
        admin_set_err(err, errlen, "database unreachable: %s", msg);
        PQfinish(c);
        return NULL;
    }
    return c;
}

PGresult *admin_pg_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                        char *err, size_t errlen)
{
    PGresult *r = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return r;
    char msg[256];
    admin_pg_first_line(r ? PQresultErrorMessage(r) : PQerrorMessage(c), msg, sizeof msg);
    admin_set_err(err, errlen, "query failed (%.40s...): %s", sql, msg);
    PQclear(r);
    return NULL;
}

int64_t admin_pg_i64(const char *s, int64_t dflt)
{
    if (!s) return dflt;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s) return dflt;
    return (int64_t)v;
}
