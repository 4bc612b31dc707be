/* admin_pg (admin_pg_): blocking PostgreSQL for the admin tools: a connection and a
 * PQexecParams that checks its status.
 *
 * Blocking (sync libpq, rdkafka): the CLI calls it directly, the admin HTTP adapter
 * (admin_http.c) only from work on libuv's thread pool, never on the loop. Functions taking
 * err/errlen fill err with a one-line message when they fail (admin_common.h). */
#ifndef TICKETD_ADMIN_PG_H
#define TICKETD_ADMIN_PG_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

/* Blocking connection to cfg->database_url (connect_timeout 10 s unless the URL says
 * otherwise). NULL with err ("database unreachable: ...") on failure. */
PGconn *admin_pg_connect(const struct cfg *cfg, const char *application_name, char *err,
                         size_t errlen);

/* PQexecParams that checks the status (PGRES_COMMAND_OK or PGRES_TUPLES_OK); NULL with err
 * (the SQL's first words and the server's message) on failure. */
PGresult *admin_pg_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                        char *err, size_t errlen);

/* The first line of a libpq message (they end with a newline and may span lines). */
void admin_pg_first_line(const char *msg, char *out, size_t outlen);

/* A PostgreSQL integer's text (NULL for SQL NULL) as a number; dflt when NULL or not one. */
int64_t admin_pg_i64(const char *s, int64_t dflt);

#endif
