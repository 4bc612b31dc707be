/* dlq (dlq_): the dead letters' header names (below, the one definition), and the dead
 * letters listed and replayed (admin HTTP and CLI). They are written by dlq_writer.h.
 *
 * Both read the DLQ topic itself (cfg->dlq_topic), every partition from its low to its high
 * watermark, with a short-lived consumer that assign()s the partitions (it carries a group
 * id, as rdkafka requires, but never subscribes or commits, so it never joins a group), and
 * join each message with its dead_letters row by (dlq_partition, dlq_offset) for the
 * replayed state.
 *
 * Replay re-handles idempotently: the original key, value and headers (dlq_* headers
 * removed, same ce_id) are produced again to the original topic and partition (headers
 * dlq_original_topic / dlq_original_partition) by an idempotent acks=all producer; once
 * acknowledged, the dead_letters row gets replayed_at (a missing row is inserted from the
 * headers, already replayed). The consumer then redoes only the effects not done yet
 * (effects.h). Skipped, and counted as such: dead letters replayed before, poison messages
 * (error class "unparseable": handling them again cannot succeed) and, within one replay,
 * a second dead letter of an event already replayed by it (marked replayed too).
 *
 * Blocking code (rdkafka, sync libpq): the CLI calls it directly; the admin HTTP adapter
 * (admin_http.c) runs it on libuv's thread pool. */
#ifndef TICKETD_DLQ_H
#define TICKETD_DLQ_H

#include <json-c/json.h>
#include <stddef.h>

#include "config.h"
#include "limits.h" /* DLQ_LIST_DEFAULT, DLQ_LIST_MAX, DLQ_READ_TIMEOUT_MS */

/* The headers a dead letter carries besides its original ones: written by dlq_writer.c,
 * read by the list, the replay (which removes them) and the trace. */
#define DLQ_H_ORIGINAL_TOPIC "dlq_original_topic"
#define DLQ_H_ORIGINAL_PARTITION "dlq_original_partition"
#define DLQ_H_ORIGINAL_OFFSET "dlq_original_offset"
#define DLQ_H_ORIGINAL_TIMESTAMP "dlq_original_timestamp" /* ms since the epoch */
#define DLQ_H_CONSUMER_GROUP "dlq_consumer_group"
#define DLQ_H_ATTEMPTS "dlq_attempts"
#define DLQ_H_ERROR_CLASS "dlq_error_class"
#define DLQ_H_ERROR_MESSAGE "dlq_error_message"     /* printable ASCII, at most 999 bytes */
#define DLQ_HEADER_COUNT 8
extern const char *const dlq_header_names[DLQ_HEADER_COUNT]; /* the eight above */

/* {"count": N (all dead letters in the topic), "truncated": bool, "dead_letters": [ {
 *   "dlq_partition", "dlq_offset", "timestamp" (ms), "key", "event_id" (ce_id or null),
 *   "original_topic", "original_partition", "original_offset", "original_timestamp",
 *   "consumer_group", "attempts", "error_class", "error_message", "replayed" (bool),
 *   "replayed_at" (or null), "dead_lettered_at" (row time, or null when no row),
 *   "value" (the original value as text, cut at 4 KiB) } ] }  -- the first `limit`.
 * Returns 0, or -1 with err filled (Kafka or DB unreachable). *out is the caller's. */
int dlq_list(const struct cfg *cfg, const char *brokers, size_t limit, json_object **out,
             char *err, size_t errlen);

/* Replays every dead letter not replayed yet (event_id NULL), or those of one event (a UUID).
 * *out: {"replayed": N, "skipped": M, "failed": F}. Returns 0, or -1 with err filled. */
int dlq_replay(const struct cfg *cfg, const char *brokers, const char *event_id,
               json_object **out, char *err, size_t errlen);

/* `ticketd dlq list [--limit N]` | `ticketd dlq replay [--event-id E]`: a main.c command
 * (parse_flags false: argv holds the arguments after "dlq"). Prints the JSON above on
 * stdout; returns the exit code (0, 1 on error, 2 on usage). */
int dlq_main(struct cfg *c, int argc, char **argv);

#endif
