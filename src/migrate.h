/* migrate: the versioned schema (docs/ARCHITECTURE.md "Schema"), applied by `ticketd migrate`
 * and at `ticketd serve` start-up.
 *
 * Migrations are an append-only array in migrate.c ({version, name, sql}); later work adds
 * versions and never edits an applied one. Each pending version runs in its own transaction
 * under pg_advisory_xact_lock(MIGRATE_LOCK_KEY) and is recorded in schema_migrations, so
 * running twice changes nothing and two processes migrating at once are safe (the second
 * waits, then finds the versions applied). Blocking libpq: never call it on the loop. */
#ifndef TICKETD_MIGRATE_H
#define TICKETD_MIGRATE_H

#include <stddef.h>

/* pg_advisory_xact_lock key of migrations ("tickmig" in ASCII); other modules' advisory
 * locks must use different keys. */
#define MIGRATE_LOCK_KEY 0x7469636b6d6967LL

/* Connects to conninfo (a URL or key=value string), retrying until timeout_ms has passed
 * (PostgreSQL may still be starting), then applies every pending migration.
 * Returns 0 when the schema is at migrate_latest_version(); otherwise a negative errno
 * (-ETIMEDOUT: could not connect in time; -EIO: a migration failed and was rolled back) with
 * a one-line message in err (password redacted). err may be NULL. */
int migrate_run(const char *conninfo, int timeout_ms, char *err, size_t errlen);

/* migrate_run, applying only the versions <= upto (upto <= 0: all). `ticketd migrate to N`
 * uses it to build an older schema, for upgrade tests. */
int migrate_run_to(const char *conninfo, int timeout_ms, int upto, char *err, size_t errlen);

/* The highest version this binary knows. */
int migrate_latest_version(void);

#endif
