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

static const char *const retention_sql =
    "DELETE FROM outbox WHERE id IN (SELECT o.id FROM outbox o WHERE o.published_at IS NOT NULL"
    " AND o.published_at < now() - $1::bigint * interval '1 millisecond'"
    " AND ((EXISTS (SELECT 1 FROM processed_events pe WHERE pe.event_id = o.event_id)"
    "   AND NOT EXISTS (SELECT 1 FROM event_effects e WHERE e.event_id = o.event_id"
    "   AND NOT e.done))"
    "  OR EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id))"
    " LIMIT " STR(RELAY_RETENTION_BATCH) ")";

static const char *const backlog_sql =
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)"
    " FROM outbox WHERE published_at IS NULL";

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
    if (deleted > 0) log_info("relay", "event=retention_deleted rows=%ld", deleted);
    if (deleted >= RELAY_RETENTION_BATCH) relay_upkeep_retention(u);
}

void relay_upkeep_retention(struct relay_upkeep *u)
{
    if (u->retention_inflight || !u->may_run(u->ud)) return;
    char ms[24];
    snprintf(ms, sizeof ms, "%" PRId64, u->retention_ms);
    const char *params[1] = {ms};
    if (dbp_query(u->db, retention_sql, 1, params, on_retention, u) == 0)
        u->retention_inflight = true;
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
