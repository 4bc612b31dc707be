/* kafka_mock: the embedded Kafka for development, tests and the demo: librdkafka's mock
 * cluster (3 brokers) with the service's topics created up front (an auto-created topic
 * would get 4 partitions). It runs on librdkafka's own threads, not on the loop. */
#ifndef TICKETD_KAFKA_MOCK_H
#define TICKETD_KAFKA_MOCK_H

#include <librdkafka/rdkafka.h> /* rdkafka_mock.h needs it first */
#include <librdkafka/rdkafka_mock.h>

struct kafka_mock;

/* Starts the cluster and creates each topic with `partitions` partitions (replication 1).
 * Returns 0 or -1 (logged). */
int kafka_mock_start(struct kafka_mock **out, int brokers, const char *const *topics,
                     int ntopics, int partitions);

/* "127.0.0.1:port,..." for bootstrap.servers; valid until kafka_mock_stop. */
const char *kafka_mock_bootstraps(const struct kafka_mock *m);

/* For fault injection (rd_kafka_mock_broker_set_down/up). */
rd_kafka_mock_cluster_t *kafka_mock_cluster(struct kafka_mock *m);
int kafka_mock_broker_count(const struct kafka_mock *m);

void kafka_mock_stop(struct kafka_mock *m);

#endif
