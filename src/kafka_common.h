/* kafka_common (kafka_): what the producer (relay), the consumer and the admin tools share:
 * building an rd_kafka_conf_t from the configuration, and bridging an rdkafka queue into
 * the loop (rd_kafka_queue_io_event_enable writes a byte to a nonblocking pipe whenever the
 * queue goes non-empty; a uv_poll_t on the pipe calls back, and the callback drains the
 * queue until empty with zero timeouts). */
#ifndef TICKETD_KAFKA_COMMON_H
#define TICKETD_KAFKA_COMMON_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "config.h"

/* bootstrap.servers = brokers, then every "k=v" of KAFKA_CONFIG (comma or newline separated)
 * as given. Returns NULL and fills errstr naming the property (never its value) on error. */
rd_kafka_conf_t *kafka_conf_new(const char *brokers, const char *extra_config, char *errstr,
                                size_t errlen);

/* Makes conf an idempotent producer: enable.idempotence=true and acks=all (the guarantees
 * are not tunable; idempotence also orders retries), linger.ms=5 unless extra_config (the
 * KAFKA_CONFIG given to kafka_conf_new) sets linger.ms or queue.buffering.max.ms, and
 * client.id when not NULL. Returns 0, or -1 with errstr naming the property. */
int kafka_conf_idempotent_producer(rd_kafka_conf_t *conf, const char *extra_config,
                                   const char *client_id, char *errstr, size_t errlen);

/* librdkafka's syslog levels as ours: 0-3 (emerg..err) error, 4 warning, 5-6 info, 7 debug. */
int kafka_log_level(int syslog_level);

/* The one librdkafka log callback: "mod=rdkafka event=log client=<handle> fac=.. msg=.." at
 * kafka_log_level(level). Safe from librdkafka's threads (log_emit writes each line whole).
 * A module with a special case wraps it and calls it for the rest. */
void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf);

/* rd_kafka_conf_set_log_cb(conf, kafka_log_cb). */
void kafka_conf_log_to_ours(rd_kafka_conf_t *conf);

/* True when librdkafka's statistics JSON shows a broker learned from metadata (node id >= 0,
 * not a bootstrap entry) in state UP. */
bool kafka_stats_broker_up(const char *stats_json);

struct kafka_bridge;

/* Watches q; on_ready(ud) runs on the loop whenever q may hold events; it must drain q
 * (poll with timeout 0 until nothing is returned). Returns 0 or -errno. */
int kafka_bridge_start(struct kafka_bridge **out, uv_loop_t *loop, rd_kafka_queue_t *q,
                       void (*on_ready)(void *ud), void *ud);

/* Disables the io event, closes the poll handle and pipe; frees on a later turn. */
void kafka_bridge_close(struct kafka_bridge *b);

/* CloudEvents header names (binary mode) used on both topics. */
#define CE_SPECVERSION "ce_specversion"
#define CE_ID "ce_id"
#define CE_SOURCE "ce_source"
#define CE_TYPE "ce_type"
#define CE_TIME "ce_time"
#define CE_CONTENT_TYPE "content-type"
#define CE_TYPE_TICKET_APPLIED "TicketApplied"
#define CE_SOURCE_TICKETD "/ticketd"

#endif
