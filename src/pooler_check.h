/* pooler_check: refuses, at `ticketd serve` start-up, a connection pooler that hands one
 * PostgreSQL server session to several client sessions (PgBouncer pool_mode = transaction or
 * statement). ticketd needs its sessions to itself: the relay LISTENs for outbox
 * notifications and holds a session-level lock, and the pools PREPARE statements once per
 * connection. Direct PostgreSQL and PgBouncer's session pooling pass.
 *
 * How: two client sessions ask for pg_backend_pid() one after the other while both stay
 * open. A private session keeps its backend, so the pids differ; a transaction pooler gives
 * the second session the backend the first one has just released, so they are equal.
 * Blocking libpq, start-up only (before the loop runs). */
#ifndef TICKETD_POOLER_CHECK_H
#define TICKETD_POOLER_CHECK_H

#include <stddef.h>

/* 0: sessions are private (or the check could not run: logged as a warning, the pools
 * retry on their own); -EPROTO: sessions are shared, with the reason in err. */
int pooler_check(const char *conninfo, char *err, size_t errlen);

#endif
