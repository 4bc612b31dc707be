/* main: `ticketd <command> [flags]`. Parses the command, loads the configuration and wires
 * the modules; no logic of its own beyond start-up order and the shutdown sequence.
 *
 * serve starts modules in the order of app.h (config -> migrate -> Kafka -> DB pool ->
 * ingest -> relay -> consumer -> HTTP) and, on SIGTERM/SIGINT, drains and closes them in
 * reverse, stage by stage (see "shutdown" below). */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "api.h"
#include "app.h"
#include "audit.h"
#include "consumer.h"
#include "dlq.h"
#include "config.h"
#include "db_pool.h"
#include "http_server.h"
#include "ingest.h"
#include "limits.h"
#include "kafka_mock_cmd.h"
#include "outbox_relay.h"
#include "report.h"
#include "trace.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"
#include "pooler_check.h"

#define DRAIN_POLL_MS 10

/* ------------------------------------------------------------------------------------- */
/* serve                                                                                 */
/* ------------------------------------------------------------------------------------- */

enum shutdown_stage {
    STAGE_RUNNING = 0,
    STAGE_DRAINING,  /* not ready, not accepting; waiting for in-flight requests */
    STAGE_API,       /* HTTP server and ingest closing */
    STAGE_PIPELINES, /* relay flush, consumer commit */
    STAGE_STORAGE,   /* DB pool, Kafka mock */
    STAGE_HANDLES,   /* signal handles and timers; the loop then ends */
};

struct server {
    struct app app;
    struct cfg cfg;
    uv_signal_t sigterm, sigint;
    uv_timer_t drain_timer;
    uv_timer_t watchdog;
    uint64_t drain_deadline_ms;
    enum shutdown_stage stage;
    int closing;     /* async closes outstanding in the current stage (+1 while starting) */
    bool forced;     /* SHUTDOWN_GRACE ran out with requests still unanswered */
};

static void shutdown_advance(struct server *s);

/* Every async close of a stage calls this when done; the last one moves to the next stage. */
static void stage_step_done(void *ud)
{
    struct server *s = ud;
    if (--s->closing == 0) shutdown_advance(s);
}

static void on_http_closed(void *ud)
{
    struct server *s = ud;
    s->app.http = NULL;
    stage_step_done(s);
}

static void on_db_closed(void *ud)
{
    struct server *s = ud;
    s->app.db = NULL;
    stage_step_done(s);
}

static void on_handle_closed(uv_handle_t *h)
{
    stage_step_done(h->data);
}

static void close_db(struct server *s)
{
    if (!s->app.db) return;
    struct dbp *db = s->app.db;
    s->closing++;
    dbp_close(db, on_db_closed, s);
}

static void shutdown_advance(struct server *s)
{
    s->stage++;
    s->closing = 1; /* held while this stage starts its closes */

    switch (s->stage) {
    case STAGE_RUNNING:
    case STAGE_DRAINING:
        break;
    case STAGE_API:
        log_info("main", "event=closing stage=api forced=%s", s->forced ? "true" : "false");
        if (s->app.http) {
            s->closing++;
            http_server_close(s->app.http, on_http_closed, s);
        }
        if (s->app.ingest) {
            ingest_close(s->app.ingest); /* pending submissions (if forced) get 503 */
            s->app.ingest = NULL;
        }
        /* Unanswered requests may wait on the DB; closing it answers them (503) so the
         * HTTP close can finish. */
        if (s->forced) close_db(s);
        break;
    case STAGE_PIPELINES:
        log_info("main", "event=closing stage=pipelines");
        if (s->app.relay) {
            s->closing++;
            relay_close(s->app.relay, stage_step_done, s);
            s->app.relay = NULL;
        }
        if (s->app.consumer) {
            s->closing++;
            consumer_close(s->app.consumer, stage_step_done, s);
            s->app.consumer = NULL;
        }
        break;
    case STAGE_STORAGE:
        log_info("main", "event=closing stage=storage");
        close_db(s);
        if (s->app.mock) {
            kafka_mock_stop(s->app.mock); /* after the relay and consumer closed */
            s->app.mock = NULL;
        }
        break;
    case STAGE_HANDLES:
        uv_timer_stop(&s->drain_timer);
        uv_timer_stop(&s->watchdog);
        s->closing += 4;
        uv_close((uv_handle_t *)&s->sigterm, on_handle_closed);
        uv_close((uv_handle_t *)&s->sigint, on_handle_closed);
        uv_close((uv_handle_t *)&s->drain_timer, on_handle_closed);
        uv_close((uv_handle_t *)&s->watchdog, on_handle_closed);
        break;
    default:
        log_info("main", "event=stopped");
        return; /* everything closed: uv_run returns */
    }
    stage_step_done(s);
}

static void on_drain_tick(uv_timer_t *t)
{
    struct server *s = t->data;
    unsigned pending = s->app.http ? http_server_pending(s->app.http) : 0;
    bool expired = uv_now(t->loop) >= s->drain_deadline_ms;
    if (pending > 0 && !expired) return;
    uv_timer_stop(t);
    if (pending > 0) {
        s->forced = true;
        log_warn("main", "event=drain_timeout unanswered=%u", pending);
    } else {
        log_info("main", "event=drained");
    }
    shutdown_advance(s); /* DRAINING -> API */
}

static void on_watchdog(uv_timer_t *t)
{
    log_error("main", "event=shutdown_stuck stage=%d action=exit", ((struct server *)t->data)->stage);
    _exit(1);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct server *s = h->data;
    if (s->stage != STAGE_RUNNING) {
        log_warn("main", "event=signal signal=%s action=exit_now", strsignal(signum));
        _exit(1);
    }
    log_info("main", "event=signal signal=%s action=drain grace_ms=%" PRId64, strsignal(signum),
             s->cfg.shutdown_grace_ms);
    s->stage = STAGE_DRAINING;
    s->app.draining = true; /* /readyz answers 503 from now on */
    if (s->app.http) http_server_stop_accepting(s->app.http);
    s->drain_deadline_ms = uv_now(h->loop) + (uint64_t)s->cfg.shutdown_grace_ms;
    uv_timer_start(&s->drain_timer, on_drain_tick, 0, DRAIN_POLL_MS);
    uv_timer_start(&s->watchdog, on_watchdog,
                   (uint64_t)s->cfg.shutdown_grace_ms + SHUTDOWN_WATCHDOG_EXTRA_MS, 0);
    uv_unref((uv_handle_t *)&s->watchdog);
}

/* Gauges about the API's DB pool and group commit, refreshed at each scrape
 * (ticketd_db_connections, per pool, is the pool's own). */
static void collect_core_metrics(void *ud)
{
    struct server *s = ud;
    if (s->app.db) {
        metrics_gauge_set("ticketd_db_pool_idle_connections", "pool=\"api\"", dbp_idle(s->app.db));
        metrics_gauge_set("ticketd_db_pool_queued_queries", "pool=\"api\"", dbp_queued(s->app.db));
    }
    if (s->app.ingest)
        metrics_gauge_set("ticketd_ingest_pending", NULL, (double)ingest_pending(s->app.ingest));
    if (s->app.http)
        metrics_gauge_set("ticketd_http_pending_requests", NULL,
                          http_server_pending(s->app.http));
    metrics_gauge_set("ticketd_draining", NULL, s->app.draining ? 1 : 0);
}

static void describe_core_metrics(void)
{
    metrics_describe("ticketd_db_pool_idle_connections", "gauge",
                     "PostgreSQL connections idle right now, per pool");
    metrics_describe("ticketd_db_pool_queued_queries", "gauge",
                     "Queries queued for a PostgreSQL connection, per pool");
    metrics_describe("ticketd_ingest_pending", "gauge",
                     "Applications queued or in flight in group commit");
    metrics_describe("ticketd_http_pending_requests", "gauge",
                     "HTTP requests received and not yet answered");
    metrics_describe("ticketd_draining", "gauge", "1 after SIGTERM/SIGINT, while draining");
}

/* Logs the effective configuration (secrets and URL passwords already redacted) as one line. */
static void log_effective_config(const struct cfg *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    if (!mem) return;
    cfg_print_effective(c, mem);
    fclose(mem);

    size_t cap = len * 2 + 64, used = 0;
    char *line = malloc(cap);
    if (!line) {
        free(text);
        return;
    }
    line[0] = '\0';
    for (char *save = NULL, *kv = strtok_r(text, "\n", &save); kv; kv = strtok_r(NULL, "\n", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = '\0';
        char quoted[1024];
        log_quote(eq + 1, quoted, sizeof quoted);
        int n = snprintf(line + used, cap - used, " %s=%s", kv, quoted);
        if (n < 0 || (size_t)n >= cap - used) break;
        used += (size_t)n;
    }
    log_info("main", "event=config%s", line);
    free(line);
    free(text);
}

static int run_migrations(const struct cfg *c, int upto)
{
    char err[512] = "";
    if (migrate_run_to(c->database_url, MIGRATE_TIMEOUT_MS, upto, err, sizeof err) != 0) {
        char *url = cfg_redact_url(c->database_url);
        char quoted[600];
        log_quote(err, quoted, sizeof quoted);
        log_error("main", "event=migrate_failed err=%s", quoted);
        fprintf(stderr, "ticketd: database migration failed (DATABASE_URL=%s): %s\n",
                url ? url : "?", err);
        free(url);
        return -1;
    }
    log_info("main", "event=schema_ready version=%d", migrate_latest_version());
    return 0;
}

/* "0.0.0.0:8080" -> host part ("0.0.0.0"); "[::1]:0" -> "[::1]". */
static void listen_host(const char *listen, char *out, size_t outlen)
{
    const char *colon = strrchr(listen, ':');
    size_t n = colon ? (size_t)(colon - listen) : strlen(listen);
    snprintf(out, outlen, "%.*s", (int)n, listen);
}

static int cmd_serve(struct cfg *c, int argc, char **argv)
{
    static struct server srv; /* lives until exit; handles point into it */
    struct server *s = &srv;
    uv_loop_t *loop = uv_default_loop();
    int rc;

    if (argc > 0) {
        fprintf(stderr, "ticketd serve: unexpected argument \"%s\"\n", argv[0]);
        return 2;
    }
    s->cfg = *c; /* take ownership of the strings */
    memset(c, 0, sizeof *c);
    s->app.loop = loop;
    s->app.cfg = &s->cfg;
    s->app.kafka_brokers = s->cfg.kafka_brokers;
    /* from here on a stalled stderr drops lines instead of stalling the loop */
    if (log_async_start((size_t)s->cfg.log_buffer_bytes) != 0) log_warn("main", "event=log_blocking");
    log_effective_config(&s->cfg);
#ifdef TICKETD_CANNED
    log_warn("main", "event=canned_mode note=\"bench-only binary: POST answers a canned 201, nothing is stored\"");
#endif

    /* 1. schema (blocking, start-up only); our sessions must be our own (no transaction pooler) */
    if (run_migrations(&s->cfg, 0)) return 1;
    char perr[768];
    if (pooler_check(s->cfg.database_url, perr, sizeof perr) != 0) {
        log_error("main", "event=pooler_refused");
        fprintf(stderr, "ticketd: refusing to start: %s\n", perr);
        return 1;
    }

    /* 2. Kafka */
    if ((s->cfg.role_relay || s->cfg.role_consumer) &&
        (!s->cfg.kafka_brokers || !*s->cfg.kafka_brokers)) {
        if (kafka_mock_start_dev(&s->app.mock, &s->cfg) != 0) return 1;
        s->app.kafka_brokers = kafka_mock_bootstraps(s->app.mock);
    }

    /* 3. DB pool for the API */
    struct dbp_opts db_opts = {
        .conninfo = s->cfg.database_url,
        .size = s->cfg.db_pool,
        .name = "api",
        .read_conns = s->cfg.db_read_conns,
        .read_queue = s->cfg.db_read_queue,
    };
    if ((rc = dbp_create(&s->app.db, loop, &db_opts)) != 0) {
        log_error("main", "event=db_pool_failed err=\"%s\"", strerror(-rc));
        return 1;
    }

    /* 4. group commit */
    struct ingest_opts ing_opts = {.batch_max = s->cfg.batch_max, .queue_max = s->cfg.queue_max,
                                   .key_ttl_ms = s->cfg.idempotency_key_ttl_ms,
                                   .queue_wait_max_ms = (uint64_t)s->cfg.queue_wait_max_ms};
    if ((rc = ingest_create(&s->app.ingest, loop, s->app.db, &ing_opts)) != 0) {
        log_error("main", "event=ingest_failed err=\"%s\"", strerror(rc < 0 ? -rc : rc));
        return 1;
    }

    /* 5. relay */
    if (s->cfg.role_relay &&
        (rc = relay_start(&s->app.relay, loop, &s->cfg, s->app.kafka_brokers)) != 0) {
        log_error("main", "event=relay_failed err=%d", rc);
        return 1;
    }

    /* 6. consumer */
    if (s->cfg.role_consumer &&
        (rc = consumer_start(&s->app.consumer, loop, &s->cfg, s->app.kafka_brokers)) != 0) {
        log_error("main", "event=consumer_failed err=%d", rc);
        return 1;
    }

    /* 7. HTTP (always: health, readiness and metrics serve every role) */
    struct http_limits limits = {
        .max_connections = s->cfg.max_connections,
        .max_header_bytes = s->cfg.max_header_bytes,
        .max_headers = s->cfg.max_headers,
        .max_body_bytes = s->cfg.max_body_bytes,
        .max_pipelined = HTTP_MAX_PIPELINED,
        .idle_timeout_ms = (uint64_t)s->cfg.idle_timeout_ms,
        .header_timeout_ms = (uint64_t)s->cfg.header_timeout_ms,
        .request_timeout_ms = (uint64_t)s->cfg.request_timeout_ms,
        .overflow_reject = strcmp(s->cfg.connection_overflow, "reject") == 0,
    };
    rc = http_server_start(&s->app.http, loop, s->cfg.listen, &limits, api_handle, &s->app);
    if (rc != 0) {
        log_error("main", "event=listen_failed listen=%s err=\"%s\"", s->cfg.listen,
                  uv_strerror(rc));
        return 1;
    }
    char host[256];
    listen_host(s->cfg.listen, host, sizeof host);
    log_info("main", "event=listening addr=%s:%d", host, http_server_port(s->app.http));

    describe_core_metrics();
    metrics_add_collector(collect_core_metrics, s);

    /* 8. signals: the first drains, a second exits at once */
    uv_signal_init(loop, &s->sigterm);
    uv_signal_init(loop, &s->sigint);
    s->sigterm.data = s->sigint.data = s;
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_timer_init(loop, &s->drain_timer);
    uv_timer_init(loop, &s->watchdog);
    s->drain_timer.data = s->watchdog.data = s;

    uv_run(loop, UV_RUN_DEFAULT);

    rc = uv_loop_close(loop);
    if (rc != 0) log_warn("main", "event=loop_close err=\"%s\"", uv_strerror(rc));
    cfg_free(&s->cfg);
    return 0;
}

/* ------------------------------------------------------------------------------------- */
/* other commands                                                                        */
/* ------------------------------------------------------------------------------------- */

static int cmd_migrate(struct cfg *c, int argc, char **argv)
{
    int upto = 0; /* "to N": only versions <= N (an older schema, for upgrade tests) */
    if (argc == 2 && strcmp(argv[0], "to") == 0) {
        char *end;
        long v = strtol(argv[1], &end, 10);
        if (*end || v < 1 || v > migrate_latest_version()) {
            fprintf(stderr, "ticketd migrate: to wants a version 1..%d\n", migrate_latest_version());
            return 2;
        }
        upto = (int)v;
    } else if (argc > 0) {
        fprintf(stderr, "ticketd migrate: unexpected argument \"%s\"\n", argv[0]);
        return 2;
    }
    if (run_migrations(c, upto)) return 1;
    log_info("main", "event=migrated");
    return 0;
}

static int cmd_config_table(struct cfg *c, int argc, char **argv)
{
    cfg_print_markdown(stdout);
    return 0;
}

static int cmd_help(struct cfg *c, int argc, char **argv);

/* A command gets the loaded configuration and the arguments left after the command name
 * (and, when parse_flags, after the settings flags). With parse_flags false the command
 * parses its own flags: c then holds defaults and the environment only. */
struct command {
    const char *name;
    int (*fn)(struct cfg *c, int argc, char **argv);
    bool parse_flags;
    const char *help;
};

static const struct command commands[] = {
    {"serve", cmd_serve, true, "run the service (the default command)"},
    {"migrate", cmd_migrate, true, "apply database migrations, then exit (migrate to N: up to version N)"},
    {"config-table", cmd_config_table, true, "print the settings as a Markdown table"},
    {"help", cmd_help, true, "this text"},
    {"audit", audit_main, false, "reconcile DB, outbox, topic, consumer and DLQ (--event-id, --since, --json)"},
    {"trace", trace_main, false, "one phone's trail: trace --phone P [--event-id E] [--scan] [--json]"},
    {"dlq", dlq_main, false, "dead letters: dlq list [--limit N] | dlq replay [--event-id E]"},
    {"report", report_main, false, "post-event report as HTML: report --event-id E [--out FILE.html]"},
    {"kafka-mock", kafka_mock_main, true, "run a standalone mock Kafka cluster (tests, demo)"},
};

#define NCOMMANDS (sizeof commands / sizeof commands[0])

static int cmd_help(struct cfg *c, int argc, char **argv)
{
    printf("usage: ticketd <command> [flags]\n\ncommands:\n");
    for (size_t i = 0; i < NCOMMANDS; i++) printf("  %-14s %s\n", commands[i].name, commands[i].help);
    printf("\n");
    cfg_print_help(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a peer closing mid-write must not kill the process */

    /* The command is the first argument; none (or a flag) means serve. */
    const struct command *cmd = &commands[0];
    int argi = 1;
    if (argc > 1 && strncmp(argv[1], "--", 2) != 0) {
        cmd = NULL;
        for (size_t i = 0; i < NCOMMANDS; i++)
            if (strcmp(argv[1], commands[i].name) == 0) cmd = &commands[i];
        if (!cmd && strcmp(argv[1], "-h") == 0) cmd = &commands[3];
        if (!cmd) {
            fprintf(stderr, "ticketd: unknown command \"%s\" (see ticketd help)\n", argv[1]);
            return 2;
        }
        argi = 2;
    } else if (argc > 1 && strcmp(argv[1], "--help") == 0) {
        return cmd_help(NULL, 0, NULL);
    }

    struct cfg c;
    int rc = cfg_load(&c, cmd->parse_flags ? argc : argi, argv, &argi);
    if (rc == 1) return 0; /* --help printed */
    if (rc != 0) return 2;
    if (log_set_level(c.log_level) != 0) log_warn("main", "event=bad_log_level");

    rc = cmd->fn(&c, argc - argi, argv + argi);
    cfg_free(&c);
    log_flush(LOG_FLUSH_EXIT_MS); /* serve's buffered lines, unless stderr is stuck */
    return rc;
}
