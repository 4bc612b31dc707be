/* relay_upkeep: outbox retention and the backlog gauges (see relay_upkeep.h). */
#include "relay_upkeep.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>

#include "db_pool.h"
#include "limits.h"
#include "log.h"
#include "metrics.h"

#define STR_(x) #x
#define STR(x) STR_(x)

/* Outbox rows whose first publication record is older than the retention and that are
 * handled (processed with every effect done, or dead-lettered). */
static const char *const retention_sql =
    "DELETE FROM outbox WHERE id IN (SELECT o.id FROM outbox_publications r,"
    " unnest(r.ids) AS u(id) JOIN outbox o ON o.id = u.id"
    " WHERE r.published_at < now() - $1::bigint * interval '1 millisecond'"
    " AND ((EXISTS (SELECT 1 FROM processed_events pe WHERE pe.event_id = o.event_id)"
    "   AND NOT EXISTS (SELECT 1 FROM event_effects e WHERE e.event_id = o.event_id"
    "   AND NOT e.done))"
    "  OR EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id))"
    " LIMIT " STR(RELAY_RETENTION_BATCH) ")";

/* Then the records none of whose rows is left (a record kept for a row still there: a
 * re-sent copy's record outlives the first). */
static const char *const records_sql =
    "DELETE FROM outbox_publications WHERE id IN (SELECT r.id FROM outbox_publications r"
    " WHERE r.published_at < now() - $1::bigint * interval '1 millisecond'"
    " AND NOT EXISTS (SELECT 1 FROM unnest(r.ids) AS u(id) JOIN outbox o ON o.id = u.id)"
    " ORDER BY r.id LIMIT " STR(RELAY_RETENTION_BATCH) ")";

/* Rows above the durable cursor without a record (the cursor lags by at most a tick). */
static const char *const backlog_sql =
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(o.created_at)), 0)"
    " FROM relay_lease l JOIN outbox_status o ON (o.xid, o.id) > (l.cursor_xid, l.cursor_id)"
    " WHERE l.name = 'relay' AND o.published_at IS NULL";

static void send_retention(struct relay_upkeep *u);

static void on_retention(void *ud, const PGresult *res, const char *error)
{
    struct relay_upkeep *u = ud;
    u->retention_inflight = false;
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        char qb[320];
        log_warn("relay", "event=retention_failed err=%s",
                 log_quoted(dbp_error_text(error, res), qb, sizeof qb));
        return;
    }
    long deleted = atol(PQcmdTuples((PGresult *)res));
    if (deleted > 0)
        log_info("relay", "event=retention_deleted %s=%ld", u->records ? "records" : "rows",
                 deleted);
    if (deleted >= RELAY_RETENTION_BATCH) {
        send_retention(u);
    } else if (!u->records) {
        u->records = true; /* rows done: now the records left without rows */
        send_retention(u);
    }
}

static void send_retention(struct relay_upkeep *u)
{
    if (u->retention_inflight || !u->may_run(u->ud)) return;
    char ms[24];
    snprintf(ms, sizeof ms, "%" PRId64, u->retention_ms);
    const char *params[1] = {ms};
    if (dbp_query(u->db, u->records ? records_sql : retention_sql, 1, params, on_retention, u) == 0)
        u->retention_inflight = true;
}

void relay_upkeep_retention(struct relay_upkeep *u)
{
    if (u->retention_inflight) return;
    u->records = false;
    send_retention(u);
}

static void on_backlog(void *ud, const PGresult *res, const char *error)
{
    struct relay_upkeep *u = ud;
    u->backlog_inflight = false;
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        metrics_gauge_set("ticketd_outbox_backlog", NULL, strtod(PQgetvalue(res, 0, 0), NULL));
        metrics_gauge_set("ticketd_outbox_oldest_unpublished_age_seconds", NULL,
                          strtod(PQgetvalue(res, 0, 1), NULL));
    }
}

void relay_upkeep_backlog(struct relay_upkeep *u, struct dbp *session)
{
    if (!u->backlog_inflight && dbp_query(session, backlog_sql, 0, NULL, on_backlog, u) == 0)
        u->backlog_inflight = true;
}

void relay_upkeep_describe(void)
{
    metrics_describe("ticketd_outbox_backlog", "gauge", "Unpublished outbox rows");
    metrics_describe("ticketd_outbox_oldest_unpublished_age_seconds", "gauge",
                     "Age of the oldest unpublished outbox row (0 when none)");
}
