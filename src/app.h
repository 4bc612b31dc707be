/* app: the process's modules and the state that crosses them. main.c builds one struct app,
 * wires the modules in order (config -> migrate -> Kafka -> DB pool -> ingest -> relay ->
 * consumer -> HTTP) and tears them down in reverse on SIGTERM/SIGINT. Modules receive the
 * pieces they need, not the whole struct, except the HTTP handlers (api.c, admin_http.c). */
#ifndef TICKETD_APP_H
#define TICKETD_APP_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"

struct dbp;
struct ingest;
struct http_server;
struct kafka_mock;
struct relay;
struct consumer;

struct app {
    uv_loop_t *loop;
    struct cfg *cfg;
    const char *kafka_brokers;    /* effective bootstrap: cfg->kafka_brokers or the mock's */
    struct kafka_mock *mock;      /* NULL unless KAFKA_BROKERS was empty */
    struct dbp *db;               /* API pool (DB_POOL connections) */
    struct ingest *ingest;
    struct http_server *http;
    struct relay *relay;          /* NULL unless ROLE has relay */
    struct consumer *consumer;    /* NULL unless ROLE has consumer */
    bool draining;                /* SIGTERM seen: /readyz answers 503 */
    bool kafka_ready;             /* metadata known (readiness) */
};

#endif
