/* outbox_relay (relay_): publishes committed outbox rows to Kafka, recording each row
 * published only from the broker's delivery report.
 *
 * One relay is active across replicas: the holder of the lease in table relay_lease
 * (renewed every RELAY_LEASE_TTL/3 on a dedicated PostgreSQL session, which also LISTENs on
 * channel "outbox"). A standby tries to claim it every min(TTL/3, 1 s), so it takes over
 * within about RELAY_LEASE_TTL + 1 s of the leader's last renewal, whether the leader died,
 * froze (SIGSTOP) or lost its network. Marks are fenced by the lease, and a leader stops
 * on its own clock before its lease can expire. The active relay claims rows in (xid, id)
 * order below the transaction horizon from its durable cursor (bounded batches, at most
 * RELAY_INFLIGHT_MAX produced and not yet acknowledged), produces them with key =
 * application id and CloudEvents headers, and on each delivery report either records the
 * row published (an outbox_publications row per partition: ids, offsets) or records the failure
 * (attempts, last_error) and retries it later with doubling backoff. Published rows older
 * than OUTBOX_RETENTION are deleted in small batches, once their event was processed (every
 * effect done) or dead-lettered. Crashes and handovers may re-send a row (same ce_id); they
 * never skip one. A transaction holding an xid open anywhere in the cluster (a long write, a
 * prepared transaction) holds back every later row until it ends (the horizon; the backlog
 * gauges show it); ingest is not affected. */
#ifndef TICKETD_OUTBOX_RELAY_H
#define TICKETD_OUTBOX_RELAY_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"

struct relay;

/* Creates the producer (bootstrap = brokers, plus cfg->kafka_config) and the relay's DB
 * sessions, and starts competing for the lock. cfg must outlive the relay.
 * Returns 0 or -errno / -1 (logged). */
int relay_start(struct relay **out, uv_loop_t *loop, const struct cfg *cfg,
                const char *brokers);

/* Stops claiming, waits (bounded: min(SHUTDOWN_GRACE, 10 s)) for in-flight delivery
 * reports and marks what was acknowledged, hands the lease back (expires it), then
 * calls done(ud) on a later turn and frees the relay. Rows still unacknowledged stay
 * unpublished and are sent again by the next active relay. */
void relay_close(struct relay *r, void (*done)(void *ud), void *ud);

/* Readiness: the producer has seen a broker up (librdkafka's statistics, every second) or
 * had a delivery acknowledged, at least once since start. It stays true through a later
 * Kafka outage on purpose: the outbox absorbs it (rows wait, 201s go on), and taking the
 * API out of rotation would turn a Kafka outage into an ingest outage. The current state
 * is the gauge ticketd_relay_kafka_up and the kafka_reachable/unreachable log lines.
 * Nonblocking. */
bool relay_kafka_ready(const struct relay *r);

/* This process holds the relay lease (renewed within its TTL) and publishes. */
bool relay_is_active(const struct relay *r);

#endif
