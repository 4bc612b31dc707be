/* kafka_common (kafka_): what the producer (relay), the consumer and the admin tools share:
 * building an rd_kafka_conf_t from the configuration, and bridging an rdkafka queue into
 * the loop (rd_kafka_queue_io_event_enable writes a byte to a nonblocking pipe whenever the
 * queue goes non-empty; a uv_poll_t on the pipe calls back, and the callback drains the
 * queue until empty with zero timeouts). */
#ifndef TICKETD_KAFKA_COMMON_H
#define TICKETD_KAFKA_COMMON_H

#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <uv.h>

#include "config.h"

/* bootstrap.servers = brokers, then every "k=v" of KAFKA_CONFIG (comma or newline separated)
 * as given. Returns NULL and fills errstr naming the property (never its value) on error. */
rd_kafka_conf_t *kafka_conf_new(const char *brokers, const char *extra_config, char *errstr,
                                size_t errlen);

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
