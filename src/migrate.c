/* migrate: versioned schema, applied with blocking libpq (CLI and start-up only). */
#include "migrate.h"

#include <errno.h>
#include <libpq-fe.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"

struct migration {
    int version;
    const char *name;
    const char *sql;
};

/* Created before anything else, in every migration transaction (under the lock), so the
 * runner can see which versions are applied. It belongs to version 1 of the schema. */
static const char schema_migrations_sql[] =
    "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())";

/* Append-only: never edit an applied version; add a new one. */
static const struct migration migrations[] = {
    {1, "initial schema",
     "CREATE TABLE applications ("
     "  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
     "  event_id        text NOT NULL,"
     "  phone           text NOT NULL,"
     "  name            text NOT NULL,"
     "  email           text,"
     "  seats           int  NOT NULL DEFAULT 1,"
     "  idempotency_key text,"
     "  created_at      timestamptz NOT NULL DEFAULT now(),"
     "  UNIQUE (event_id, phone));"
     "CREATE INDEX applications_phone_idx ON applications (phone);"
     "CREATE TABLE outbox ("
     "  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
     "  event_id        uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),"
     "  aggregate_id    bigint NOT NULL,"
     "  event_type      text NOT NULL,"
     "  payload         jsonb NOT NULL,"
     "  created_at      timestamptz NOT NULL DEFAULT now(),"
     "  published_at    timestamptz,"
     "  kafka_partition int,"
     "  kafka_offset    bigint,"
     "  attempts        int NOT NULL DEFAULT 0,"
     "  last_error      text);"
     "CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;"
     "CREATE INDEX outbox_aggregate_idx ON outbox (aggregate_id);"
     "CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;"
     "CREATE TABLE processed_events ("
     "  event_id        uuid PRIMARY KEY,"
     "  consumer_group  text NOT NULL,"
     "  topic           text NOT NULL,"
     "  partition       int NOT NULL,"
     "  \"offset\"        bigint NOT NULL,"
     "  processed_at    timestamptz NOT NULL DEFAULT now());"
     "CREATE TABLE points_ledger ("
     "  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
     "  event_id        uuid NOT NULL UNIQUE,"
     "  application_id  bigint NOT NULL,"
     "  phone           text NOT NULL,"
     "  points          int NOT NULL,"
     "  created_at      timestamptz NOT NULL DEFAULT now());"
     "CREATE TABLE event_effects ("
     "  event_id        uuid NOT NULL,"
     "  effect          text NOT NULL CHECK (effect IN ('points', 'data_platform', 'email')),"
     "  application_id  bigint NOT NULL,"
     "  done            boolean NOT NULL DEFAULT false,"
     "  attempts        int NOT NULL DEFAULT 0,"
     "  last_error      text,"
     "  updated_at      timestamptz NOT NULL DEFAULT now(),"
     "  PRIMARY KEY (event_id, effect));"
     "CREATE TABLE dead_letters ("
     "  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
     "  event_id        uuid NOT NULL,"
     "  application_id  bigint,"
     "  src_topic       text NOT NULL,"
     "  src_partition   int NOT NULL,"
     "  src_offset      bigint NOT NULL,"
     "  dlq_partition   int NOT NULL,"
     "  dlq_offset      bigint NOT NULL,"
     "  attempts        int NOT NULL,"
     "  error_class     text NOT NULL,"
     "  error_message   text NOT NULL,"
     "  dead_lettered_at timestamptz NOT NULL DEFAULT now(),"
     "  replayed_at     timestamptz);"
     "CREATE INDEX dead_letters_event_idx ON dead_letters (event_id);"},
    /* The phone index only serves equality lookups (trace by phone). A hash index costs
     * about half of the btree's work per insert on the group-commit path (no key
     * comparisons down a tree of random keys); see docs/PERFORMANCE.md. */
    {2, "hash index for phone lookups",
     "DROP INDEX IF EXISTS applications_phone_idx;"
     "CREATE INDEX applications_phone_idx ON applications USING hash (phone);"},
    /* Issue 12. reference: the applicant's unguessable handle (UUID v4, 122 random bits);
     * the volatile default fills existing rows in the same rewrite. Idempotency keys become
     * unique where given (an earlier row keeps a key reused by later ones) and carry the
     * SHA-256 of the canonical request (validate_fingerprint; computed here the same way
     * for the keys already stored). Keys are pruned after IDEMPOTENCY_KEY_TTL (by created_at). */
    {3, "application reference, idempotency fingerprint",
     "ALTER TABLE applications ADD COLUMN reference uuid NOT NULL DEFAULT gen_random_uuid(),"
     "  ADD COLUMN idempotency_fingerprint bytea;"
     "CREATE UNIQUE INDEX applications_reference_idx ON applications (reference);"
     "UPDATE applications a SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL"
     "  AND EXISTS (SELECT 1 FROM applications b WHERE b.idempotency_key = a.idempotency_key"
     "              AND b.id < a.id);"
     "UPDATE applications SET idempotency_fingerprint = sha256("
     "  convert_to(event_id, 'UTF8') || '\\x00'::bytea || convert_to(phone, 'UTF8') || '\\x00'::bytea"
     "  || convert_to(name, 'UTF8') || '\\x00'::bytea || convert_to(coalesce(email, ''), 'UTF8')"
     "  || '\\x00'::bytea || convert_to(seats::text, 'UTF8')) WHERE idempotency_key IS NOT NULL;"
     "CREATE UNIQUE INDEX applications_idempotency_key_idx ON applications (idempotency_key)"
     "  WHERE idempotency_key IS NOT NULL;"},
    /* The e-mail step claims its row before calling SMTP (effects.c claim_email): one sender
     * per event at a time, across consumers, rebalances and re-sent copies. */
    {4, "e-mail send claims",
     "ALTER TABLE event_effects ADD COLUMN claim_token uuid,"
     " ADD COLUMN claimed_until timestamptz;"},
    /* Relay leadership as a lease (outbox_relay.c): one row, renewed in place. */
    {5, "relay lease",
     "CREATE TABLE relay_lease ("
     "  name       text PRIMARY KEY,"
     "  holder     text NOT NULL DEFAULT '',"
     "  epoch      bigint NOT NULL DEFAULT 0,"
     "  expires_at timestamptz NOT NULL DEFAULT '-infinity');"
     "INSERT INTO relay_lease (name) VALUES ('relay');"},
    /* Issue 14: publication is an insert-only record (outbox_publications, one row per
     * partition per mark: the ids and their offsets) instead of an UPDATE of the outbox row
     * that was never HOT. The relay reads outbox in (xid, id) order below the transaction
     * horizon from a durable cursor in the lease row (docs/ARCHITECTURE.md "The relay's
     * cursor"). Rows already there get xid 0; the cursor starts below the first unpublished
     * one; their publications become records, one per (partition, published_at), i.e. per
     * mark statement. outbox_status is outbox with its first publication, for readers. */
    {6, "insert-only publication records",
     "ALTER TABLE outbox ADD COLUMN xid xid8 NOT NULL DEFAULT '0';"
     "ALTER TABLE outbox ALTER COLUMN xid SET DEFAULT pg_current_xact_id();"
     "CREATE TABLE outbox_publications ("
     "  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
     "  kafka_partition int,"
     "  ids             bigint[] NOT NULL,"
     "  offsets         bigint[] NOT NULL,"
     "  first_id        bigint NOT NULL,"
     "  last_id         bigint NOT NULL,"
     "  epoch           bigint NOT NULL,"
     "  published_at    timestamptz NOT NULL DEFAULT now());"
     "CREATE INDEX outbox_publications_range_idx ON outbox_publications"
     "  USING gist (int8range(first_id, last_id, '[]'));"
     "INSERT INTO outbox_publications (kafka_partition, ids, offsets, first_id, last_id, epoch,"
     "  published_at) SELECT kafka_partition, array_agg(id ORDER BY id),"
     "  array_agg(kafka_offset ORDER BY id), min(id), max(id), 0, published_at FROM outbox"
     "  WHERE published_at IS NOT NULL GROUP BY kafka_partition, published_at;"
     "ALTER TABLE relay_lease ADD COLUMN cursor_xid xid8 NOT NULL DEFAULT '0',"
     "  ADD COLUMN cursor_id bigint NOT NULL DEFAULT 0;"
     "UPDATE relay_lease SET cursor_id = coalesce("
     "  (SELECT min(id) - 1 FROM outbox WHERE published_at IS NULL),"
     "  (SELECT max(id) FROM outbox), 0);"
     "DROP INDEX outbox_unpublished_idx;"
     "DROP INDEX outbox_published_idx;"
     "ALTER TABLE outbox DROP COLUMN published_at, DROP COLUMN kafka_partition,"
     "  DROP COLUMN kafka_offset;"
     "CREATE INDEX outbox_xid_idx ON outbox (xid, id);"
     "CREATE VIEW outbox_status AS SELECT o.*, p.published_at, p.kafka_partition, p.kafka_offset"
     "  FROM outbox o LEFT JOIN LATERAL (SELECT r.published_at, r.kafka_partition,"
     "  r.offsets[array_position(r.ids, o.id)] AS kafka_offset FROM outbox_publications r"
     "  WHERE int8range(r.first_id, r.last_id, '[]') @> o.id AND o.id = ANY (r.ids)"
     "  ORDER BY r.id LIMIT 1) p ON true;"},
};

#define NMIGRATIONS ((int)(sizeof migrations / sizeof migrations[0]))

int migrate_latest_version(void)
{
    /* The highest, not the last: branches append their versions in any order. */
    int v = 0;
    for (int i = 0; i < NMIGRATIONS; i++)
        if (migrations[i].version > v) v = migrations[i].version;
    return v;
}

/* Formats a one-line message into err (libpq messages carry newlines). */
static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    size_t n = strlen(err);
    for (size_t i = 0; i < n; i++)
        if (err[i] == '\n' || err[i] == '\r') err[i] = ' ';
    while (n > 0 && err[n - 1] == ' ') err[--n] = '\0';
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void quiet_notices(void *arg, const char *message)
{
    (void)arg;
    (void)message; /* "relation already exists, skipping" and the like */
}

static PGconn *connect_until(const char *conninfo, int timeout_ms, char *err, size_t errlen)
{
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    char last[512] = "";
    int attempts = 0;
    for (;;) {
        int64_t left = deadline - now_ms();
        char secs[24];
        /* libpq's connect_timeout is in whole seconds (minimum 2). */
        snprintf(secs, sizeof secs, "%lld", (long long)(left > 2000 ? (left + 999) / 1000 : 2));
        const char *const keys[] = {"connect_timeout", "application_name", "dbname", NULL};
        const char *const values[] = {secs, "ticketd-migrate", conninfo, NULL};
        PGconn *pg = PQconnectdbParams(keys, values, 1);
        attempts++;
        if (pg && PQstatus(pg) == CONNECTION_OK) {
            PQsetNoticeProcessor(pg, quiet_notices, NULL);
            return pg;
        }
        snprintf(last, sizeof last, "%s", pg ? PQerrorMessage(pg) : "out of memory");
        PQfinish(pg);
        if (attempts == 1) {
            char q[600];
            log_quote(last, q, sizeof q);
            log_info("migrate", "event=waiting_for_database timeout_ms=%d error=%s", timeout_ms, q);
        }
        left = deadline - now_ms();
        if (left <= 0) break;
        sleep_ms(left < 250 ? left : 250);
    }
    char *redacted = cfg_redact_url(conninfo);
    set_err(err, errlen, "could not connect to PostgreSQL at %s within %d ms (%d attempts): %s",
            redacted ? redacted : "(conninfo)", timeout_ms, attempts, last);
    free(redacted);
    return NULL;
}

/* Runs sql (several statements allowed); on failure fills err and returns false. */
static bool exec_ok(PGconn *pg, const char *sql, const char *what, char *err, size_t errlen)
{
    PGresult *r = PQexec(pg, sql);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok) set_err(err, errlen, "%s failed: %s", what, PQerrorMessage(pg));
    PQclear(r);
    return ok;
}

/* Applies one migration unless already recorded. Returns 1 applied, 0 already there,
 * -1 failed (rolled back, err set). */
static int apply_one(PGconn *pg, const struct migration *m, char *err, size_t errlen)
{
    char what[160];
    snprintf(what, sizeof what, "migration %d (%s)", m->version, m->name);
    char lock[96];
    snprintf(lock, sizeof lock, "SELECT pg_advisory_xact_lock(%lld)", (long long)MIGRATE_LOCK_KEY);
    if (!exec_ok(pg, "BEGIN", what, err, errlen)) return -1;
    if (!exec_ok(pg, lock, what, err, errlen)) goto fail;
    /* Create it only when missing (IF NOT EXISTS alone would still need CREATE rights). */
    PGresult *r = PQexec(pg, "SELECT to_regclass('schema_migrations') IS NULL");
    bool missing = r && PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
                   PQgetvalue(r, 0, 0)[0] == 't';
    if (!r || PQresultStatus(r) != PGRES_TUPLES_OK) {
        set_err(err, errlen, "%s: %s", what, PQerrorMessage(pg));
        PQclear(r);
        goto fail;
    }
    PQclear(r);
    if (missing && !exec_ok(pg, schema_migrations_sql, what, err, errlen)) goto fail;

    char version[16];
    snprintf(version, sizeof version, "%d", m->version);
    const char *params[2] = {version, m->name};
    r = PQexecParams(pg, "SELECT 1 FROM schema_migrations WHERE version = $1::int", 1,
                               NULL, params, NULL, NULL, 0);
    if (!r || PQresultStatus(r) != PGRES_TUPLES_OK) {
        set_err(err, errlen, "%s: reading schema_migrations failed: %s", what, PQerrorMessage(pg));
        PQclear(r);
        goto fail;
    }
    bool applied = PQntuples(r) > 0;
    PQclear(r);
    if (applied) return exec_ok(pg, "COMMIT", what, err, errlen) ? 0 : -1;

    if (!exec_ok(pg, m->sql, what, err, errlen)) goto fail;
    r = PQexecParams(pg, "INSERT INTO schema_migrations (version, name) VALUES ($1::int, $2)", 2,
                     NULL, params, NULL, NULL, 0);
    if (!r || PQresultStatus(r) != PGRES_COMMAND_OK) {
        set_err(err, errlen, "%s: recording it failed: %s", what, PQerrorMessage(pg));
        PQclear(r);
        goto fail;
    }
    PQclear(r);
    if (!exec_ok(pg, "COMMIT", what, err, errlen)) return -1;
    return 1;

fail:
    PQclear(PQexec(pg, "ROLLBACK"));
    return -1;
}

int migrate_run(const char *conninfo, int timeout_ms, char *err, size_t errlen)
{
    return migrate_run_to(conninfo, timeout_ms, 0, err, errlen);
}

int migrate_run_to(const char *conninfo, int timeout_ms, int upto, char *err, size_t errlen)
{
    if (err && errlen) err[0] = '\0';
    if (!conninfo) {
        set_err(err, errlen, "no DATABASE_URL given");
        return -EINVAL;
    }
    PGconn *pg = connect_until(conninfo, timeout_ms, err, errlen);
    if (!pg) return -ETIMEDOUT;

    int rc = 0, applied = 0;
    for (int i = 0; i < NMIGRATIONS; i++) {
        if (upto > 0 && migrations[i].version > upto) continue;
        int r = apply_one(pg, &migrations[i], err, errlen);
        if (r < 0) {
            rc = -EIO;
            break;
        }
        if (r > 0) {
            applied++;
            log_info("migrate", "event=migration_applied version=%d name=\"%s\"",
                     migrations[i].version, migrations[i].name);
        }
    }
    if (rc == 0) {
        /* A newer binary may have migrated further; that is its business, not an error. */
        PGresult *r = PQexec(pg, "SELECT max(version) FROM schema_migrations");
        int dbv = (r && PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
                      ? atoi(PQgetvalue(r, 0, 0))
                      : -1;
        PQclear(r);
        log_info("migrate", "event=schema_ready version=%d applied=%d latest_known=%d", dbv,
                 applied, migrate_latest_version());
    } else {
        char q[600];
        log_quote(err ? err : "", q, sizeof q);
        log_error("migrate", "event=migration_failed error=%s", q);
    }
    PQfinish(pg);
    return rc;
}
