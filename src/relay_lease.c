/* relay_lease: the relay's leadership lease (see relay_lease.h). */
#include "relay_lease.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <uv.h>

#include "db_pool.h"
#include "limits.h"
#include "log.h"
#include "metrics.h"

/* $1 holder, $2 epoch (renew, release), $3 TTL in ms, $4 the query's sequence number.
 * Claim and renew answer the epoch held and $4 (so a late answer is told from the latest).
 * A missing lease row (deleted by hand) is put back by a claim; the next claim takes it. */
static const char *const claim_sql =
    "WITH missing AS (INSERT INTO relay_lease (name) SELECT 'relay' WHERE NOT EXISTS"
    " (SELECT 1 FROM relay_lease WHERE name = 'relay') ON CONFLICT DO NOTHING) "
    "UPDATE relay_lease SET holder = $1, epoch = epoch + 1,"
    " expires_at = now() + $3::bigint * interval '1 millisecond'"
    " WHERE name = 'relay' AND (expires_at <= now() OR holder = $1) AND $2::bigint >= 0"
    " RETURNING epoch, $4::bigint, cursor_xid::text, cursor_id";
static const char *const renew_sql =
    "UPDATE relay_lease SET expires_at = now() + $3::bigint * interval '1 millisecond'"
    " WHERE name = 'relay' AND holder = $1 AND epoch = $2::bigint AND expires_at > now()"
    " RETURNING epoch, $4::bigint";
static const char *const release_sql =
    "UPDATE relay_lease SET expires_at = now() WHERE name = 'relay' AND holder = $1"
    " AND epoch = $2::bigint AND $3::bigint >= 0 RETURNING epoch";

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000u; /* not uv_now: the loop's cached time may be stale */
}

static const char *db_error(const char *error, const PGresult *res, char *buf, size_t n)
{
    return log_quoted(dbp_error_text(error, res), buf, n);
}

void relay_lease_init(struct relay_lease *l, int64_t ttl_ms, const struct relay_lease_hooks *hooks,
                      void *ud)
{
    *l = (struct relay_lease){.ttl_ms = ttl_ms > 0 ? (uint64_t)ttl_ms : 10000,
                              .hooks = hooks, .ud = ud};
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = '\0';
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t start_us = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    snprintf(l->holder, sizeof l->holder, "%s/%d/%" PRIx64, host, (int)getpid(), start_us);
}

uint64_t relay_lease_poll_ms(const struct relay_lease *l)
{
    uint64_t every = l->ttl_ms / 3;
    return every > RELAY_LEASE_POLL_MAX_MS ? RELAY_LEASE_POLL_MAX_MS : every;
}

void relay_lease_lose(struct relay_lease *l, const char *why)
{
    if (!l->held) return;
    l->held = false;
    l->hooks->lost(l->ud, why);
}

bool relay_lease_held(struct relay_lease *l)
{
    if (!l->held) return false;
    if (mono_ms() < l->until) return true;
    relay_lease_lose(l, "lease_expired");
    return false;
}

static void on_answer(void *ud, const PGresult *res, const char *error)
{
    struct relay_lease *l = ud;
    bool renewing = l->renewing;
    l->inflight = false;
    if (l->sent_gen != l->gen || l->stopped) return;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        /* Kept while it lasts: relay_lease_held() lets go when the TTL runs out. */
        char qb[320];
        log_warn("relay", "event=lease_query_failed renewing=%d err=%s", renewing,
                 db_error(error, res, qb, sizeof qb));
        return;
    }
    if (PQntuples(res) == 1) {
        int64_t epoch = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        /* The answer to an older query (sent before one that hung): its send time is not
         * sent_at, so it proves nothing; the next renewal or claim decides. */
        if (strtoull(PQgetvalue(res, 0, 1), NULL, 10) != l->seq) return;
        if (renewing) {
            if (!l->held || epoch != l->epoch) return; /* lost meanwhile: claim again */
        } else {
            if (l->held || l->closing) return;
            l->epoch = epoch;
            l->cursor_xid = strtoull(PQgetvalue(res, 0, 2), NULL, 10);
            l->cursor_id = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
        }
        l->renewed_at = l->sent_at;
        l->until = l->sent_at + l->ttl_ms - l->ttl_ms / 10;
        if (!renewing && mono_ms() < l->until) {
            l->held = true;
            l->standby_logged = false;
            log_info("relay", "event=lease_acquired epoch=%" PRId64 " ttl_ms=%" PRIu64, epoch,
                     l->ttl_ms);
            l->hooks->acquired(l->ud);
        }
    } else if (renewing) {
        relay_lease_lose(l, "lease_taken_over");
    } else if (!l->standby_logged) {
        l->standby_logged = true;
        metrics_gauge_set("ticketd_relay_active", NULL, 0);
        log_info("relay", "event=standby why=lease_held_elsewhere ttl_ms=%" PRIu64, l->ttl_ms);
    }
}

static void send_query(struct relay_lease *l, struct dbp *session, const char *sql)
{
    char epoch[24], ttl[24], seq[24];
    snprintf(epoch, sizeof epoch, "%" PRId64, l->epoch);
    snprintf(ttl, sizeof ttl, "%" PRIu64, l->ttl_ms);
    snprintf(seq, sizeof seq, "%" PRIu64, l->seq + 1);
    const char *params[4] = {l->holder, epoch, ttl, seq};
    uint64_t now = mono_ms();
    if (dbp_query(session, sql, 4, params, on_answer, l) != 0) return;
    l->seq++;
    l->inflight = true;
    l->sent_gen = l->gen;
    l->sent_at = now;
}

void relay_lease_tick(struct relay_lease *l, struct dbp *session)
{
    if (l->stopped || !session || !dbp_connected(session)) return;
    if (l->inflight && mono_ms() - l->sent_at < l->ttl_ms) return;
    if (relay_lease_held(l)) {
        if (mono_ms() - l->renewed_at < l->ttl_ms / 3) return;
        l->renewing = true;
        send_query(l, session, renew_sql);
    } else if (!l->closing) {
        l->renewing = false;
        send_query(l, session, claim_sql);
    }
}

void relay_lease_session_changed(struct relay_lease *l)
{
    l->gen++;
    l->inflight = false;
}

static void on_release(void *ud, const PGresult *res, const char *error)
{
    struct relay_lease *l = ud;
    l->release_inflight = false;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        char qb[320];
        log_warn("relay", "event=lease_release_failed err=%s note=\"a standby waits for the TTL\"",
                 db_error(error, res, qb, sizeof qb));
    }
    l->hooks->released(l->ud);
}

void relay_lease_release(struct relay_lease *l, struct dbp *session)
{
    char epoch[24];
    snprintf(epoch, sizeof epoch, "%" PRId64, l->epoch);
    const char *params[3] = {l->holder, epoch, "0"};
    l->released = true; /* tried once */
    if (dbp_connected(session) && dbp_query(session, release_sql, 3, params, on_release, l) == 0)
        l->release_inflight = true;
}
