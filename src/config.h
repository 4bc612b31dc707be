/* config: one declarative table (config.c: name, env var, flag, type, default, bounds,
 * secret flag, help) is the single source for parsing, --help and the README's table.
 * Defaults are written as strings and go through the same parser as user input. */
#ifndef TICKETD_CONFIG_H
#define TICKETD_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct cfg {
    /* connections */
    char *database_url;        /* DATABASE_URL */
    char *kafka_brokers;       /* KAFKA_BROKERS; empty -> in-process mock cluster */
    char *kafka_config;        /* KAFKA_CONFIG: "k=v,k=v" extra librdkafka properties (secret) */
    int kafka_partitions;      /* KAFKA_PARTITIONS: partitions of topics the mock creates */
    char *topic;               /* KAFKA_TOPIC, default ticket-applied */
    char *dlq_topic;           /* KAFKA_DLQ_TOPIC, default ticket-applied.DLQ */
    char *consumer_group;      /* CONSUMER_GROUP, default ticket-consumer-group */
    char *listen;              /* LISTEN host:port, default 0.0.0.0:8080 */
    char *admin_token;         /* ADMIN_TOKEN (secret); empty -> admin paths refused */
    char *data_platform_url;   /* DATA_PLATFORM_URL; empty -> sink off */
    char *smtp_url;            /* SMTP_URL; empty -> e-mail off */
    bool smtp_allow_cleartext; /* SMTP_ALLOW_CLEARTEXT: false -> TLS required */
    char *mail_from;           /* MAIL_FROM */
    char *role;                /* ROLE: comma list of api,relay,consumer */
    bool role_api, role_relay, role_consumer; /* derived from role */

    /* ingest */
    int db_pool;               /* DB_POOL: PostgreSQL connections for the API */
    int db_read_conns;         /* DB_READ_CONNS: connections reads may hold; 0 = half */
    int db_read_queue;         /* DB_READ_QUEUE: reads queued before a quick 503 */
    int batch_max;             /* BATCH_MAX: applications per group commit; 1 = off */
    int queue_max;             /* QUEUE_MAX: pending applications before 503 */
    int64_t idempotency_key_ttl_ms; /* IDEMPOTENCY_KEY_TTL: keys replay this long, then pruned */
    int64_t queue_wait_max_ms; /* QUEUE_WAIT_MAX: admission by queue wait; 0 = off */

    /* HTTP limits */
    int max_connections;       /* MAX_CONNECTIONS */
    int max_header_bytes;      /* MAX_HEADER_BYTES: total header bytes -> 431 */
    int max_headers;           /* MAX_HEADERS: header count -> 431 */
    int max_body_bytes;        /* MAX_BODY_BYTES -> 413 */
    int64_t idle_timeout_ms;   /* IDLE_TIMEOUT: keep-alive idle */
    int64_t header_timeout_ms; /* HEADER_TIMEOUT: whole request head must arrive (slowloris) */
    int64_t request_timeout_ms;/* REQUEST_TIMEOUT: whole request incl. body; 0 = off */
    char *connection_overflow; /* CONNECTION_OVERFLOW: backlog or reject */
    int64_t shutdown_grace_ms; /* SHUTDOWN_GRACE: drain budget after SIGTERM */

    /* relay */
    int64_t relay_interval_ms; /* RELAY_INTERVAL: fallback poll when no NOTIFY */
    int relay_batch;           /* RELAY_BATCH: rows claimed per round */
    int relay_inflight_max;    /* RELAY_INFLIGHT_MAX: produced, not yet acknowledged */
    int64_t relay_retry_backoff_ms; /* RELAY_RETRY_BACKOFF: after a failed delivery */
    int64_t relay_lease_ttl_ms;     /* RELAY_LEASE_TTL: leadership lease, default 10s */
    int64_t outbox_retention_ms;    /* OUTBOX_RETENTION: published rows kept, default 7d */

    /* consumer */
    int retry_max_attempts;    /* RETRY_MAX_ATTEMPTS, default 3 */
    int64_t retry_backoff_ms;  /* RETRY_BACKOFF, default 1s */
    bool retry_exponential;    /* RETRY_EXPONENTIAL: backoff doubles, with jitter */
    int points_per_application;/* POINTS_PER_APPLICATION */
    int64_t http_timeout_ms;   /* SINK_TIMEOUT: data platform / SMTP request timeout */
    int64_t consumer_session_timeout_ms; /* CONSUMER_SESSION_TIMEOUT: session.timeout.ms */
    char *consumer_instance_id;          /* CONSUMER_INSTANCE_ID: group.instance.id or "" */

    /* audit */
    int64_t audit_grace_ms;    /* AUDIT_GRACE: rows younger than this may be unpublished */

    char *log_level;           /* LOG_LEVEL: debug, info, warn, error */
    int log_buffer_bytes;      /* LOG_BUFFER: serve's stderr buffer; beyond it lines are dropped */
};

/* Fills c with defaults, then the environment, then flags argv[*argi..] ("--batch-max 1" or
 * "--batch-max=1"); stops at the first non-flag argument and leaves *argi there.
 * On a bad value, an unknown flag or "--help", prints a message naming the setting and its
 * allowed range to stderr and returns -1 (--help: prints help, returns 1). 0 on success. */
int cfg_load(struct cfg *c, int argc, char **argv, int *argi);

/* Frees the strings cfg_load allocated. */
void cfg_free(struct cfg *c);

/* --help text: every setting with its env var, flag, default and doc. */
void cfg_print_help(FILE *out);

/* The effective configuration, one "NAME=value" per line, secrets and URL passwords redacted. */
void cfg_print_effective(const struct cfg *c, FILE *out);

/* The configuration table as a Markdown table (for README.md; `ticketd config-table`). */
void cfg_print_markdown(FILE *out);

/* Copies s with any password in a URL or "password=" conninfo field replaced by "***". */
char *cfg_redact_url(const char *s);

#endif
