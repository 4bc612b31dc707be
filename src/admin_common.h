/* admin_common (admin_): what the admin tools (audit, trace, dlq) share.
 *
 *   - PostgreSQL: a blocking connection and a PQexecParams that checks its status;
 *   - Kafka: a read-only consumer that assign()s partitions and never subscribes (so it never
 *     joins a group, even when it carries the service's group id to read its committed
 *     offsets), metadata, watermarks, committed offsets, a sequential reader of one
 *     partition, and a scan of a whole topic from its low to its high watermarks. rdkafka's
 *     own log lines of these handles go through log.h (mod=rdkafka), never raw to stderr;
 *   - a message's header, key and timestamp as text;
 *   - the frame of the CLI commands `ticketd audit|trace` (the command's own flags first,
 *     then the settings flags).
 *
 * All of it blocks (sync libpq, rdkafka's blocking calls): the CLI calls it directly, the
 * admin HTTP adapter (admin_http.c) only from work run on libuv's thread pool, never on the
 * loop. Functions taking err/errlen fill err with a one-line message when they fail. */
#ifndef TICKETD_ADMIN_COMMON_H
#define TICKETD_ADMIN_COMMON_H

#include <json-c/json.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "config.h"

/* snprintf into err (nothing when err is NULL or errlen 0). */
void admin_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- PostgreSQL ---------------------------------------------------------------------- */

/* Blocking connection to cfg->database_url (connect_timeout 10 s unless the URL says
 * otherwise). NULL with err ("database unreachable: ...") on failure. */
PGconn *admin_pg_connect(const struct cfg *cfg, const char *application_name, char *err,
                         size_t errlen);

/* PQexecParams that checks the status (PGRES_COMMAND_OK or PGRES_TUPLES_OK); NULL with err
 * (the SQL's first words and the server's message) on failure. */
PGresult *admin_pg_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                        char *err, size_t errlen);

/* The first line of a libpq message (they end with a newline and may span lines). */
void admin_pg_first_line(const char *msg, char *out, size_t outlen);

/* A PostgreSQL integer's text (NULL for SQL NULL) as a number; dflt when NULL or not one. */
int64_t admin_pg_i64(const char *s, int64_t dflt);

/* ---- Kafka ----------------------------------------------------------------------------- */

/* A consumer for reading topics by assign() (never subscribe: it never joins a group) and for
 * committed() of `group`; no commits, no offset reset past data, tuned for sequential
 * throughput with bounded prefetch. Destroy it with admin_kafka_destroy. */
rd_kafka_t *admin_kafka_reader(const struct cfg *cfg, const char *brokers, const char *group,
                               const char *client_id, char *err, size_t errlen);

/* Sends the log lines of the handle made from conf through log.h (other admin handles). */
void admin_kafka_log_to_ours(rd_kafka_conf_t *conf);

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
/* Milliseconds since the epoch as RFC 3339 UTC ("2026-11-26T19:40:00.123Z"), or "unknown". */
void admin_format_ms(int64_t ms, char *out, size_t outlen);

/* A JSON string of s, or JSON null (NULL) when s is NULL. */
json_object *admin_json_text(const char *s);

/* ---- CLI: `ticketd audit|trace [own flags] [settings flags]` --------------------------- */

struct admin_cli {
    const char *command;         /* "audit": messages say "ticketd audit: ..." */
    void (*usage)(FILE *out);
    char **rest;                 /* the command, then the arguments kept for cfg_load */
    int nrest;
    bool json;                   /* --json */
    int status;                  /* -1 while parsing goes on; else the exit status (0 after
                                    --help, 2 after a usage error, both already printed) */
};

/* 0, or -1 (out of memory). argc: how many arguments the command has. */
int admin_cli_init(struct admin_cli *cli, const char *command, void (*usage)(FILE *out),
                   int argc);
/* Takes "--name value" / "--name=value" at argv[*i] into *value; true when it matched (a
 * missing value is a usage error: cli->status becomes 2). */
bool admin_cli_flag(struct admin_cli *cli, int argc, char **argv, int *i, const char *name,
                    const char **value);
/* Any other argument: --json, --help/-h (usage on stdout, status 0), or kept for cfg_load. */
void admin_cli_other(struct admin_cli *cli, char *arg);

/* A tool run for the CLI (cfg->kafka_brokers is set): the report goes to human_out or
 * *json_out; returns how much it found (>= 0), -1 on error or -2 on bad options (err). */
typedef int (*admin_cli_run_fn)(const struct cfg *cfg, const void *opts, FILE *human_out,
                                json_object **json_out, char *err, size_t errlen);

/* Unless parsing already ended (--help, usage error): loads the settings (environment, then
 * the kept flags), runs run(&cfg, opts, ...) and prints its report (human text on stdout, or
 * the JSON with --json) or its error. Frees cli. Returns the exit status: 0 after --help, 2 on
 * any error (printed; without Kafka brokers the hint names http_example, the admin URL that
 * answers the same), else if_found when run found something and if_none when not. */
int admin_cli_run(struct admin_cli *cli, const char *http_example, admin_cli_run_fn run,
                  const void *opts, int if_found, int if_none);

/* "--name value" / "--name=value" at argv[*i]: true when it matched; a missing value prints
 * "ticketd: --name needs a value" and sets *bad. */
bool admin_take_flag(int argc, char **argv, int *i, const char *name, const char **value,
                     bool *bad);

#endif
