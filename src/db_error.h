/* db_error (dbp_error_): what a failed query means, for db_pool and its callers. */
#ifndef TICKETD_DB_ERROR_H
#define TICKETD_DB_ERROR_H

#include <libpq-fe.h>
#include <stdbool.h>

/* Whether a failed query's cause is the database rather than the query: res NULL (the
 * connection was lost or never up) or an SQLSTATE of class 08 (connection), 25006 (read-only
 * transaction: a standby or a read-only database), 40 (deadlock, serialization), 53
 * (insufficient resources: disk full, out of memory, too many connections), 57 (operator
 * intervention: admin shutdown, crash recovery), 58 (system error), 55P03 (lock not
 * available). Callers wait for such errors instead of blaming the data. A connection that
 * got 25006 is closed after the callback (db_pool) and reconnects (a new session sees a database made
 * writable again, or follows a failover). */
bool dbp_error_is_ours(const PGresult *res);

/* Why a query failed, for a log: error when given, else res's error message, else "?". Quote
 * it (log_quoted): it is free-form text. */
const char *dbp_error_text(const char *error, const PGresult *res);

/* The session became read-only (SQLSTATE 25006): db_pool recycles the connection. */
bool dbp_error_read_only(const PGresult *res);

#endif
