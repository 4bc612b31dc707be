/* outbox_relay (relay_): publishes committed outbox rows to Kafka, marking each row
 * published only from the broker's delivery report.
 *
 * One relay is active across replicas: the holder of a session-level advisory lock on a
 * dedicated PostgreSQL session (which also LISTENs on channel "outbox"). A standby retries
 * the lock every RELAY_INTERVAL, so it takes over within seconds of the active session
 * dying. The active relay claims unpublished rows in id order (bounded batches, at most
 * RELAY_INFLIGHT_MAX produced and not yet acknowledged), produces them with key =
 * application id and CloudEvents headers, and on each delivery report either marks the row
 * published (published_at, kafka_partition, kafka_offset) or records the failure
 * (attempts, last_error) and retries it later with doubling backoff. Published rows older
 * than OUTBOX_RETENTION are deleted in small batches. Crashes may re-send a row (same
 * ce_id); they never skip one. */
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
 * reports and marks what was acknowledged, releases the lock by closing its session, then
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

/* This process holds the relay lock and publishes. */
bool relay_is_active(const struct relay *r);

#endif
