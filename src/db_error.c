/* db_error: SQLSTATE classes of failures that are the database's, not the query's. */
#include "db_error.h"

#include <stddef.h>
#include <string.h>

static const char *sqlstate(const PGresult *res)
{
    const char *st = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return st && strlen(st) == 5 ? st : NULL;
}

bool dbp_error_read_only(const PGresult *res)
{
    const char *st = sqlstate(res);
    return st && strcmp(st, "25006") == 0;
}

bool dbp_error_is_ours(const PGresult *res)
{
    if (!res) return true;
    const char *st = sqlstate(res);
    if (!st) return false;
    static const char *const classes[] = {"08", "40", "53", "57", "58"};
    for (size_t i = 0; i < sizeof classes / sizeof *classes; i++)
        if (strncmp(st, classes[i], 2) == 0) return true;
    return strcmp(st, "25006") == 0 || strcmp(st, "55P03") == 0;
}

const char *dbp_error_text(const char *error, const PGresult *res)
{
    return error ? error : res ? PQresultErrorMessage(res) : "?";
}
