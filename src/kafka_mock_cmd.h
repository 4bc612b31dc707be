/* kafka_mock_cmd: `ticketd kafka-mock`, a standalone mock cluster that several ticketd
 * processes and tests share. Prints "bootstrap=<addr>" on stdout, then reads commands on
 * stdin, one per line, answering "ok" (or "error <why>") to each:
 *   down | up            all brokers down / up
 *   down N | up N        broker N (1-based id) down / up
 *   produce-errors N ERR the next N Produce requests fail with Kafka error code ERR
 *   clear-errors         forget injected Produce errors
 * Exits 0 on SIGTERM/SIGINT, or at EOF of a stdin that is a pipe or terminal (the parent
 * went away); with stdin on /dev/null or a file it runs until signalled. */
#ifndef TICKETD_KAFKA_MOCK_CMD_H
#define TICKETD_KAFKA_MOCK_CMD_H

#include <librdkafka/rdkafka.h> /* before kafka_mock.h: rdkafka_mock.h needs it */

#include "config.h"
#include "kafka_mock.h"

int kafka_mock_main(struct cfg *c, int argc, char **argv);

/* serve with KAFKA_BROKERS empty: starts the in-process mock (3 brokers, c->topic and
 * c->dlq_topic with c->kafka_partitions partitions) and logs a loud development-only
 * warning with its bootstrap address. Returns 0 or -1 (logged). */
int kafka_mock_start_dev(struct kafka_mock **out, const struct cfg *c);

#endif
