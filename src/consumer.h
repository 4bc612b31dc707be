/* consumer (consumer_): the group consumer of the TicketApplied topic, on the loop.
 *
 * Guarantee: a partition's committed offset moves past an event only when its effects
 * committed (effects.h) or the DLQ writer reported it written (dlq_writer.h: produced to
 * the DLQ, acknowledged by the broker and mirrored in dead_letters). No error path commits
 * anything else. Owns: partitions and their windows, order, retries and backoff, offsets.
 * An event's effects run behind one call of effects (effects_run: one outcome per round).
 *
 * - rdkafka consumer in group CONSUMER_GROUP, enable.auto.commit=false,
 *   enable.auto.offset.store=false; its queue is bridged into the loop (kafka_bridge) and
 *   drained with rd_kafka_consumer_poll(rk, 0); rebalance and commit callbacks run there too.
 * - In order per partition: each partition hands out a window of up to PART_WINDOW
 *   consecutive events to effects_run, in offset order. effects batches them (effects.h,
 *   effects_batch.h): after each poll phase the points step of every ready event of every
 *   partition goes out as one statement (up to 1,024 events, at most 2 statements in flight:
 *   group commit); the external calls (data platform, then e-mail) run one at a time per
 *   partition, in offset order, so the sink receives a partition's events in order, retries
 *   included, while the partitions run in parallel (libcurl multi, keep-alive connections);
 *   their done marks go out batched too (one UPDATE for many). Without sink and SMTP an event
 *   is done after the points statement. Each partition's offset is committed for its
 *   contiguous finished prefix only: never past an unfinished event.
 * - Flow control: when more than 32,768 fetched events are unfinished, the partitions holding
 *   more than their window are paused until fewer than 16,384 are (pausing is rare on purpose:
 *   librdkafka refetches a paused partition only ~1 s after the resume).
 * - Failures are per event: a failed step (points statement, external call, done mark) is
 *   retried, from that step, up to RETRY_MAX_ATTEMPTS attempts in all, RETRY_BACKOFF apart
 *   (doubling with +-25% jitter with RETRY_EXPONENTIAL): a timer retries; a failing call
 *   holds back the later calls of its partition (order), not their points, and once the
 *   partition holds a full window while one of its events waits, it is paused (resumed when
 *   the wait is over). A done mark that fails is retried without repeating
 *   the call. After the last attempt the original key, value and headers
 *   plus dlq_* headers (dlq.h) go to the DLQ topic through the DLQ writer's idempotent
 *   acks=all producer; on its delivery report the dead_letters row is inserted (retried
 *   until it is), and only then the offset may move. An event that cannot be parsed goes to the DLQ
 *   at once (error class "unparseable"); its dead_letters.event_id is its ce_id if that is a
 *   UUID, else md5(topic/partition/offset) as a UUID.
 * - Our own database being unhealthy (dbp_error_is_ours, or no connection) is never the
 *   event's failure: the step waits (200 ms doubling to 10 s) without using an attempt, and
 *   the outage is logged once. Each e-mail attempt claims the event first (effects, one
 *   token per copy of the event): a claim held by another copy makes the event wait
 *   (EFFECTS_RETRY, no attempt); done marks of a revoked partition's finished calls are still
 *   written (effects_detach).
 * - Membership: CONSUMER_SESSION_TIMEOUT (session.timeout.ms) and CONSUMER_INSTANCE_ID
 *   (group.instance.id, static membership) unless KAFKA_CONFIG sets them.
 * - Offsets are committed asynchronously (rd_kafka_commit with an explicit list), at most
 *   every 200 ms, for partitions whose next committable offset (last finished + 1) moved.
 * - Rebalance (eager or cooperative): on revoke, the partition stops handing out work, its
 *   finished offset is committed, its events are detached from effects (effects_detach), its
 *   queued messages are dropped (the next owner reads them again), then the partitions are
 *   unassigned. Work still in flight finishes but
 *   commits nothing; the next owner redoes it idempotently.
 * - "Offset out of range" is never silent. auto.offset.reset=earliest, and rdkafka's log
 *   (log.queue: served by our polls on the loop) is watched: a reset caused by an error (the
 *   position fell below the log start, or beyond its end) is logged at error level and
 *   counted in ticketd_consumer_offset_out_of_range_total{partition}; the partition goes on
 *   from the log start (the events below it are gone; the audit names them). A new group's
 *   start (no committed offset) is not an error and is not counted.
 *   Why not auto.offset.reset=error + an explicit seek: in librdkafka 2.0.2 the partition's
 *   fetcher is stopped by that error and rd_kafka_seek_partitions() then fails with
 *   RD_KAFKA_RESP_ERR__STATE (seen here); only a re-assign of the whole assignment would
 *   restart it, and a new group would hit it for every partition. Should that error arrive all
 *   the same (RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET), it is reported and counted the same.
 *
 * Metrics: ticketd_consumer_processed_total, ticketd_consumer_retries_total,
 * ticketd_dlq_produced_total, ticketd_sink_failures_total{effect},
 * ticketd_consumer_offset_out_of_range_total{partition}, ticketd_consumer_lag{partition}
 * (collector: high watermark - next offset to handle),
 * ticketd_consumer_publish_to_processed_seconds (message timestamp -> effects done),
 * ticketd_consumer_points_batch_size and ticketd_consumer_marks_batch_size (events per
 * statement). */
#ifndef TICKETD_CONSUMER_H
#define TICKETD_CONSUMER_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"

struct consumer;

/* Creates the consumer (its own DB pool, HTTP client and DLQ producer) and subscribes to
 * cfg->topic. Returns 0 or -errno / -1 (logged). cfg and brokers must outlive it. */
int consumer_start(struct consumer **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *brokers);

/* Graceful stop: hands out no new work, waits (up to SHUTDOWN_GRACE, at most 10 s) for runs
 * and DLQ deliveries in flight, commits the finished offsets, closes the consumer
 * asynchronously (rd_kafka_consumer_close_queue, served on the loop; bounded), destroys the
 * rdkafka handles on the thread pool, then calls done(ud) and frees c. */
void consumer_close(struct consumer *c, void (*done)(void *ud), void *ud);

/* true once the group was joined (the first assignment, possibly empty, arrived). */
bool consumer_ready(const struct consumer *c);

#endif
