/* relay_lease: leadership of the outbox relay across replicas, all nonblocking.
 *
 * The lease is the row of table relay_lease (holder, epoch, expires_at by the DB clock).
 * A standby claims it with a conditional UPDATE once expired, which bumps the epoch (the
 * fencing token); the leader renews it every TTL/3 on the relay's session. The relay's mark
 * UPDATE applies only while this holder and epoch hold an unexpired lease, checked in the
 * same statement (outbox_relay.c, mark_sql). No row lock on the lease: a mark whose snapshot
 * predates a takeover's commit is ordered before it, and what it writes is true (the broker
 * acknowledged it); a FOR SHARE lock would cost a WAL record per mark. The leader also
 * stops on its own clock: once the last successful renewal was sent more than 9/10 of the
 * TTL ago (monotonic), relay_lease_held() lets go, before the DB can let anybody else in.
 * The lease costs one row update per renewal, never one per outbox row. The row also
 * carries the relay's durable cursor (cursor_xid, cursor_id), answered by the claim and
 * stored by the leader once a tick under the same fence (outbox_relay.c, cursor_sql).
 *
 * The owner embeds a struct relay_lease, calls relay_lease_tick() every
 * relay_lease_poll_ms() and relay_lease_session_changed() on each (dis)connect of the
 * session, and learns of changes through the hooks (called on the loop, never from inside
 * a relay_lease_* call except relay_lease_held's "lease_expired"). */
#ifndef TICKETD_RELAY_LEASE_H
#define TICKETD_RELAY_LEASE_H

#include <stdbool.h>
#include <stdint.h>

struct dbp;

struct relay_lease_hooks {
    void (*acquired)(void *ud);              /* now the leader, with lease.epoch */
    void (*lost)(void *ud, const char *why); /* no longer: drop what is in hand */
    void (*released)(void *ud);              /* the release query was answered */
};

struct relay_lease {
    char holder[128];     /* this process in relay_lease.holder: host/pid/start time */
    int64_t epoch;        /* fencing token of the lease held (valid while held) */
    uint64_t cursor_xid;  /* the durable relay cursor the lease row held when acquired */
    int64_t cursor_id;
    bool held;
    bool closing;         /* set by the owner: no more claims, no acquisition */
    bool stopped;         /* set by the owner at teardown: answers are ignored */
    bool released, release_inflight; /* relay_lease_release was tried / is in flight */

    /* internal */
    uint64_t ttl_ms;
    uint64_t until;       /* monotonic ms: past it, this process stops relaying */
    uint64_t renewed_at;  /* monotonic ms the last successful renewal was sent */
    uint64_t sent_at, sent_gen, gen, seq; /* of the latest query sent; gen bumps per session */
    bool inflight, renewing, standby_logged;
    const struct relay_lease_hooks *hooks;
    void *ud;
};

/* ttl_ms <= 0 means 10 s. hooks must outlive the lease. */
void relay_lease_init(struct relay_lease *l, int64_t ttl_ms, const struct relay_lease_hooks *hooks,
                      void *ud);

/* How often to call relay_lease_tick: min(TTL/3, 1 s). */
uint64_t relay_lease_poll_ms(const struct relay_lease *l);

/* True while this process may relay: it holds the lease and renewed it recently enough by
 * its own clock (a process woken from SIGSTOP finds out here, before it marks anything).
 * On expiry calls hooks->lost("lease_expired") first. */
bool relay_lease_held(struct relay_lease *l);

/* Lets go (hooks->lost(why)) if held. */
void relay_lease_lose(struct relay_lease *l, const char *why);

/* The leader renews when due, a standby tries to claim. One query at a time; one stuck
 * longer than the TTL (a hung link) no longer counts. */
void relay_lease_tick(struct relay_lease *l, struct dbp *session);

/* The session (re)connected or dropped: an answer still due is ignored. The lease outlives
 * the session: renewed on the next one, or lost at its TTL. */
void relay_lease_session_changed(struct relay_lease *l);

/* Hands the lease back (expires it now) so a standby need not wait for the TTL; tried
 * once. release_inflight tells whether hooks->released is still to come. */
void relay_lease_release(struct relay_lease *l, struct dbp *session);

#endif
