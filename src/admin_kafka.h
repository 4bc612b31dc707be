/* admin_kafka (admin_): the read-only Kafka side of the admin tools: a consumer that
 * assign()s partitions and never subscribes (so it never joins a group, even when it carries
 * the service's group id to read its committed offsets), metadata, watermarks, committed
 * offsets, a sequential reader of one partition, a scan of a whole topic from its low to its
 * high watermarks, and a message's header and key as text. rdkafka's own log lines of these
 * handles go through log.h (mod=rdkafka), never raw to stderr.
 *
 * Blocking (sync libpq, rdkafka): the CLI calls it directly, the admin HTTP adapter
 * (admin_http.c) only from work on libuv's thread pool, never on the loop. Functions taking
 * err/errlen fill err with a one-line message when they fail (admin_common.h). */
#ifndef TICKETD_ADMIN_KAFKA_H
#define TICKETD_ADMIN_KAFKA_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

/* A consumer for reading topics by assign() (never subscribe: it never joins a group) and for
 * committed() of `group`; no commits, no offset reset past data, tuned for sequential
 * throughput with bounded prefetch. Destroy it with admin_kafka_destroy. */
rd_kafka_t *admin_kafka_reader(const struct cfg *cfg, const char *brokers, const char *group,
                               const char *client_id, char *err, size_t errlen);

/* Closes (it never subscribed: there is no group to leave) and destroys rk; NULL is fine. */
void admin_kafka_destroy(rd_kafka_t *rk);

/* The committed offsets of the service's consumer group (cfg->consumer_group) on cfg->topic,
 * read with a short-lived handle that carries the group id but never subscribes, so it never
 * joins the group: *n partitions and *offsets (n entries, -1 = nothing committed; the caller
 * frees it). 0 or -1. */
int admin_group_offsets(const struct cfg *cfg, const char *brokers, const char *client_id,
                        int *n, int64_t **offsets, char *err, size_t errlen);

/* Partition count of topic, 0 when the topic does not exist, -1 on error. */
int admin_topic_partitions(rd_kafka_t *rk, const char *topic, char *err, size_t errlen);

/* Low and high watermarks; 0 or -1. */
int admin_watermarks(rd_kafka_t *rk, const char *topic, int32_t partition, int64_t *low,
                     int64_t *high, char *err, size_t errlen);

/* Committed offsets of rk's group for partitions 0..n-1 into out (-1 = none committed);
 * 0, or -1 when the request or any partition's fetch failed (never turned into "none"). */
int admin_committed(rd_kafka_t *rk, const char *topic, int n, int64_t *out, char *err,
                    size_t errlen);

/* Sequential reader of one partition from `start` up to (not including) `high`. When
 * retention deletes the log under it, it carries on from the new log start and moves `low`
 * up (the caller counts what lay below as expired). */
struct admin_reader {
    rd_kafka_t *rk;
    rd_kafka_queue_t *queue;
    const char *topic;
    int32_t partition;
    int64_t next;       /* offset expected next */
    int64_t low;        /* log start; moves up if retention deletes while reading */
    int64_t high;       /* stop here (the watermark read before) */
    rd_kafka_message_t *batch[512];
    int nbatch, ibatch;
    bool eof;
};
/* 0 or -1; call admin_reader_close in both cases. */
int admin_reader_open(struct admin_reader *r, rd_kafka_t *rk, const char *topic,
                      int32_t partition, int64_t start, int64_t low, int64_t high, char *err,
                      size_t errlen);
/* 1 and *msg (destroy it with rd_kafka_message_destroy) | 0 at the end | -1. */
int admin_reader_next(struct admin_reader *r, rd_kafka_message_t **msg, char *err,
                      size_t errlen);
void admin_reader_close(struct admin_reader *r);

/* Calls visit(ud, m) for every message of every partition of topic, from its low to its high
 * watermark as read when the partition's turn comes (m is destroyed after visit returns).
 * timeout_ms > 0 bounds the whole scan. A topic that does not exist has no messages.
 * Returns 0, or -1. */
typedef void (*admin_visit_fn)(void *ud, const rd_kafka_message_t *m);
int admin_scan_topic(rd_kafka_t *rk, const char *topic, int64_t timeout_ms, admin_visit_fn visit,
                     void *ud, char *err, size_t errlen);

/* ---- message fields -------------------------------------------------------------------- */

/* The value of header `name` copied into out as a string ("" when absent or null); true when
 * it has a value. */
bool admin_header(const rd_kafka_message_t *m, const char *name, char *out, size_t outlen);
/* The key as printable text (non-printable bytes as '?', cut to outlen-1). */
void admin_key_text(const rd_kafka_message_t *m, char *out, size_t outlen);

#endif
