/* config: the one settings table. Every field of struct cfg has exactly one row; defaults are
 * strings parsed by the same code as the environment and flags (pgbouncer's habit), so a
 * default can never bypass validation. Precedence: default < environment < flag. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "strbuf.h"

enum cfg_type {
    CFG_STRING,   /* char * */
    CFG_URL,      /* char *, password redacted when printed */
    CFG_INT,      /* int, plain integer */
    CFG_SIZE,     /* int, bytes; accepts k/KiB and m/MiB suffixes */
    CFG_BOOL,     /* bool: true/false, 1/0, yes/no, on/off */
    CFG_DURATION, /* int64_t milliseconds; ms/s/m/h/d suffixes, bare number = ms */
    CFG_ENUM,     /* char *, one of choices */
    CFG_SET,      /* char *, comma list of choices (at least one) */
};

struct cfg_setting {
    const char *name;    /* snake_case; the flag is --kebab-case of it */
    const char *env;
    enum cfg_type type;
    const char *def;     /* default, as a string */
    int64_t min, max;    /* numeric bounds (ms for durations) */
    bool secret;         /* never printed, never echoed in errors */
    const char *choices; /* CFG_ENUM / CFG_SET: comma list */
    const char *help;
    size_t offset;       /* into struct cfg */
};

#define SEC_MS 1000LL
#define MIN_MS (60 * SEC_MS)
#define HOUR_MS (60 * MIN_MS)
#define DAY_MS (24 * HOUR_MS)
#define F(field) offsetof(struct cfg, field)

static const struct cfg_setting settings[] = {
    /* connections */
    {"database_url", "DATABASE_URL", CFG_URL, "postgresql:///ticketd", 0, 0, false, NULL,
     "PostgreSQL connection string (URL or key=value conninfo); its password is never printed",
     F(database_url)},
    {"kafka_brokers", "KAFKA_BROKERS", CFG_STRING, "", 0, 0, false, NULL,
     "Kafka bootstrap servers host:port,...; empty starts an in-process mock cluster "
     "(development and demo only)",
     F(kafka_brokers)},
    {"kafka_config", "KAFKA_CONFIG", CFG_STRING, "", 0, 0, true, NULL,
     "extra librdkafka properties k=v,k=v (security.protocol, SASL, TLS), passed through as given",
     F(kafka_config)},
    {"kafka_partitions", "KAFKA_PARTITIONS", CFG_INT, "12", 1, 1000, false, NULL,
     "partitions of the topics the mock cluster creates", F(kafka_partitions)},
    {"kafka_topic", "KAFKA_TOPIC", CFG_STRING, "ticket-applied", 0, 0, false, NULL,
     "topic the relay publishes applications to", F(topic)},
    {"kafka_dlq_topic", "KAFKA_DLQ_TOPIC", CFG_STRING, "ticket-applied.DLQ", 0, 0, false, NULL,
     "dead-letter topic", F(dlq_topic)},
    {"consumer_group", "CONSUMER_GROUP", CFG_STRING, "ticket-consumer-group", 0, 0, false, NULL,
     "Kafka consumer group id", F(consumer_group)},
    {"listen", "LISTEN", CFG_STRING, "0.0.0.0:8080", 0, 0, false, NULL,
     "HTTP listen address host:port (port 0 picks a free port)", F(listen)},
    {"admin_token", "ADMIN_TOKEN", CFG_STRING, "", 0, 0, true, NULL,
     "bearer token for /admin paths; empty refuses them", F(admin_token)},
    {"data_platform_url", "DATA_PLATFORM_URL", CFG_URL, "", 0, 0, false, NULL,
     "data-platform sink endpoint (HTTP POST); empty turns the sink off", F(data_platform_url)},
    {"smtp_url", "SMTP_URL", CFG_URL, "", 0, 0, false, NULL,
     "SMTP server URL (smtp://user:pass@host:port); empty turns e-mail off", F(smtp_url)},
    {"smtp_allow_cleartext", "SMTP_ALLOW_CLEARTEXT", CFG_BOOL, "false", 0, 0, false, NULL,
     "allow SMTP without TLS (a local test server); false requires smtps:// or STARTTLS, so "
     "credentials and addresses never travel in the clear",
     F(smtp_allow_cleartext)},
    {"mail_from", "MAIL_FROM", CFG_STRING, "ticketd@localhost", 0, 0, false, NULL,
     "sender address of confirmation e-mails", F(mail_from)},
    {"role", "ROLE", CFG_SET, "api,relay,consumer", 0, 0, false, "api,relay,consumer",
     "what this process runs: comma list of api, relay, consumer", F(role)},

    /* ingest */
    {"db_pool", "DB_POOL", CFG_INT, "4", 1, 256, false, NULL,
     "PostgreSQL connections for the API", F(db_pool)},
    {"db_read_conns", "DB_READ_CONNS", CFG_INT, "0", 0, 256, false, NULL,
     "API connections that reads (GET lookups) may use at once; 0 = half of DB_POOL (at least "
     "1); the others stay free for ingest",
     F(db_read_conns)},
    {"db_read_queue", "DB_READ_QUEUE", CFG_INT, "64", 0, 100000, false, NULL,
     "reads queued for a connection; beyond it a read gets 503 with Retry-After at once",
     F(db_read_queue)},
    {"batch_max", "BATCH_MAX", CFG_INT, "512", 1, 10000, false, NULL,
     "applications per group commit; 1 turns group commit off", F(batch_max)},
    {"queue_max", "QUEUE_MAX", CFG_INT, "20000", 1, 10000000, false, NULL,
     "pending applications before new ones get 503 at once", F(queue_max)},
    {"idempotency_key_ttl", "IDEMPOTENCY_KEY_TTL", CFG_DURATION, "24h", 0, 365 * DAY_MS, false,
     NULL, "how long an Idempotency-Key replays its 201 (pruned within a quarter of it "
     "afterwards); 0 keeps keys forever", F(idempotency_key_ttl_ms)},
    {"queue_wait_max", "QUEUE_WAIT_MAX", CFG_DURATION, "2s", 0, HOUR_MS, false, NULL,
     "oldest queued application's wait beyond which new ones get 503 at once; 0 turns it off",
     F(queue_wait_max_ms)},

    /* HTTP limits */
    {"max_connections", "MAX_CONNECTIONS", CFG_INT, "10000", 1, 1000000, false, NULL,
     "open HTTP connections; beyond it new ones wait (CONNECTION_OVERFLOW)", F(max_connections)},
    {"max_header_bytes", "MAX_HEADER_BYTES", CFG_SIZE, "8192", 256, 1048576, false, NULL,
     "total bytes of a request head; beyond it 431", F(max_header_bytes)},
    {"max_headers", "MAX_HEADERS", CFG_INT, "64", 1, 1000, false, NULL,
     "header fields per request; beyond it 431", F(max_headers)},
    {"max_body_bytes", "MAX_BODY_BYTES", CFG_SIZE, "16384", 64, 16777216, false, NULL,
     "request body bytes; beyond it 413", F(max_body_bytes)},
    {"idle_timeout", "IDLE_TIMEOUT", CFG_DURATION, "60s", 1, DAY_MS, false, NULL,
     "keep-alive connection idle timeout", F(idle_timeout_ms)},
    {"header_timeout", "HEADER_TIMEOUT", CFG_DURATION, "10s", 1, HOUR_MS, false, NULL,
     "time for a whole request head to arrive (slowloris guard); beyond it 408",
     F(header_timeout_ms)},
    {"request_timeout", "REQUEST_TIMEOUT", CFG_DURATION, "30s", 0, HOUR_MS, false, NULL,
     "time for a whole request (head and body) to arrive; beyond it 408; 0 turns it off",
     F(request_timeout_ms)},
    {"connection_overflow", "CONNECTION_OVERFLOW", CFG_ENUM, "backlog", 0, 0, false,
     "backlog,reject",
     "at MAX_CONNECTIONS: backlog stops accepting (the kernel queues), reject answers 503",
     F(connection_overflow)},
    {"shutdown_grace", "SHUTDOWN_GRACE", CFG_DURATION, "20s", 0, HOUR_MS, false, NULL,
     "drain budget after SIGTERM/SIGINT before closing anyway", F(shutdown_grace_ms)},

    /* relay */
    {"relay_interval", "RELAY_INTERVAL", CFG_DURATION, "1s", 1, HOUR_MS, false, NULL,
     "outbox poll interval when no NOTIFY arrives", F(relay_interval_ms)},
    {"relay_batch", "RELAY_BATCH", CFG_INT, "1000", 1, 100000, false, NULL,
     "outbox rows claimed per relay round", F(relay_batch)},
    {"relay_inflight_max", "RELAY_INFLIGHT_MAX", CFG_INT, "20000", 1, 1000000, false, NULL,
     "messages produced and not yet acknowledged", F(relay_inflight_max)},
    {"relay_retry_backoff", "RELAY_RETRY_BACKOFF", CFG_DURATION, "500ms", 0, HOUR_MS, false,
     NULL, "wait after a failed delivery before producing again", F(relay_retry_backoff_ms)},
    {"relay_lease_ttl", "RELAY_LEASE_TTL", CFG_DURATION, "10s", 1000, 10 * MIN_MS, false, NULL,
     "relay leadership lease; a standby takes over this long after the leader stops renewing",
     F(relay_lease_ttl_ms)},
    {"outbox_retention", "OUTBOX_RETENTION", CFG_DURATION, "7d", 0, 3650 * DAY_MS, false, NULL,
     "how long published outbox rows are kept before pruning", F(outbox_retention_ms)},

    /* consumer */
    {"retry_max_attempts", "RETRY_MAX_ATTEMPTS", CFG_INT, "3", 1, 100, false, NULL,
     "handling attempts of an event before it is dead-lettered", F(retry_max_attempts)},
    {"retry_backoff", "RETRY_BACKOFF", CFG_DURATION, "1s", 0, HOUR_MS, false, NULL,
     "wait between handling attempts", F(retry_backoff_ms)},
    {"retry_exponential", "RETRY_EXPONENTIAL", CFG_BOOL, "false", 0, 0, false, NULL,
     "double the backoff after each attempt, with jitter", F(retry_exponential)},
    {"points_per_application", "POINTS_PER_APPLICATION", CFG_INT, "100", 0, 1000000, false,
     NULL, "points credited per processed application", F(points_per_application)},
    {"sink_timeout", "SINK_TIMEOUT", CFG_DURATION, "5s", 1, 10 * MIN_MS, false, NULL,
     "timeout of a data-platform or SMTP request", F(http_timeout_ms)},
    {"consumer_session_timeout", "CONSUMER_SESSION_TIMEOUT", CFG_DURATION, "10s", 1000,
     10 * MIN_MS, false, NULL,
     "Kafka session.timeout.ms: a consumer that stops heartbeating (killed, frozen) loses its "
     "partitions after this",
     F(consumer_session_timeout_ms)},
    {"consumer_instance_id", "CONSUMER_INSTANCE_ID", CFG_STRING, "", 0, 0, false, NULL,
     "Kafka group.instance.id (static membership), stable per replica (the pod name of a "
     "StatefulSet): a restart within the session timeout gets its partitions back without a "
     "rebalance; empty = dynamic membership",
     F(consumer_instance_id)},

    /* audit */
    {"audit_grace", "AUDIT_GRACE", CFG_DURATION, "10s", 0, 7 * DAY_MS, false, NULL,
     "applications younger than this may still be unpublished or unconsumed (audit: in progress, not missing)",
     F(audit_grace_ms)},

    {"log_level", "LOG_LEVEL", CFG_ENUM, "info", 0, 0, false, "debug,info,warn,error",
     "least severe level logged", F(log_level)},
    {"log_buffer", "LOG_BUFFER", CFG_SIZE, "1M", 4096, 268435456, false, NULL,
     "serve: log bytes buffered for stderr; when stderr does not keep up, lines beyond it are "
     "dropped (ticketd_log_dropped_total) rather than stalling the service", F(log_buffer_bytes)},
};

#define NSETTINGS (sizeof settings / sizeof settings[0])

/* ---- value parsers: return 0, or -1 with a reason in why ---- */

static int parse_i64(const char *s, int64_t *out)
{
    char *end;
    if (!*s || isspace((unsigned char)*s)) return -1;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

/* Splits "<digits><suffix>" and multiplies; rejects overflow. */
static int parse_scaled(const char *s, const char *const *suffixes, const int64_t *scales,
                        size_t nsuffixes, int64_t *out)
{
    const char *p = s;
    if (*p == '-' || *p == '+') p++;
    if (!isdigit((unsigned char)*p)) return -1;
    while (isdigit((unsigned char)*p)) p++;
    char num[32];
    size_t n = (size_t)(p - s);
    if (n >= sizeof num) return -1;
    memcpy(num, s, n);
    num[n] = '\0';
    int64_t v;
    if (parse_i64(num, &v)) return -1;
    int64_t scale = 0;
    for (size_t i = 0; i < nsuffixes; i++) {
        if (strcmp(p, suffixes[i]) == 0) {
            scale = scales[i];
            break;
        }
    }
    if (!scale) return -1;
    if (v > INT64_MAX / scale || v < INT64_MIN / scale) return -1;
    *out = v * scale;
    return 0;
}

static int parse_duration(const char *s, int64_t *ms)
{
    static const char *const suffixes[] = {"", "ms", "s", "m", "h", "d"};
    static const int64_t scales[] = {1, 1, SEC_MS, MIN_MS, HOUR_MS, DAY_MS};
    return parse_scaled(s, suffixes, scales, 6, ms);
}

static int parse_size(const char *s, int64_t *bytes)
{
    static const char *const suffixes[] = {"", "k", "K", "KiB", "m", "M", "MiB"};
    static const int64_t scales[] = {1, 1024, 1024, 1024, 1048576, 1048576, 1048576};
    return parse_scaled(s, suffixes, scales, 7, bytes);
}

static int parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "1", "yes", "on"};
    static const char *const no[] = {"false", "0", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -1;
}

/* Is the token s[0..len) one of the comma-separated choices? */
static bool in_choices(const char *choices, const char *s, size_t len)
{
    const char *p = choices;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == len && strncmp(p, s, len) == 0) return true;
        if (!comma) break;
        p = comma + 1;
    }
    return false;
}

/* Comma list, items trimmed of spaces, each one of choices, at least one item. */
static int check_set(const char *choices, const char *s)
{
    int items = 0;
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && isspace((unsigned char)*a)) a++;
        while (b > a && isspace((unsigned char)b[-1])) b--;
        if (a == b || !in_choices(choices, a, (size_t)(b - a))) return -1;
        items++;
        if (!comma) break;
        p = comma + 1;
    }
    return items > 0 ? 0 : -1;
}

static bool set_has(const char *s, const char *item)
{
    size_t n = strlen(item);
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && isspace((unsigned char)*a)) a++;
        while (b > a && isspace((unsigned char)b[-1])) b--;
        if ((size_t)(b - a) == n && strncmp(a, item, n) == 0) return true;
        if (!comma) return false;
        p = comma + 1;
    }
}

static void flag_of(const struct cfg_setting *s, char *out, size_t outlen)
{
    size_t o = 0;
    if (outlen < 3) return;
    out[o++] = '-';
    out[o++] = '-';
    for (const char *p = s->name; *p && o + 1 < outlen; p++) out[o++] = *p == '_' ? '-' : *p;
    out[o] = '\0';
}

static void format_duration(int64_t ms, char *out, size_t outlen)
{
    if (ms != 0 && ms % DAY_MS == 0) snprintf(out, outlen, "%lldd", (long long)(ms / DAY_MS));
    else if (ms != 0 && ms % HOUR_MS == 0) snprintf(out, outlen, "%lldh", (long long)(ms / HOUR_MS));
    else if (ms != 0 && ms % MIN_MS == 0) snprintf(out, outlen, "%lldm", (long long)(ms / MIN_MS));
    else if (ms != 0 && ms % SEC_MS == 0) snprintf(out, outlen, "%llds", (long long)(ms / SEC_MS));
    else snprintf(out, outlen, "%lldms", (long long)ms);
}

/* "an integer from 1 to 10000", for messages, help and the README. */
static void describe_allowed(const struct cfg_setting *s, char *out, size_t outlen)
{
    switch (s->type) {
    case CFG_INT:
        snprintf(out, outlen, "an integer from %lld to %lld", (long long)s->min,
                 (long long)s->max);
        break;
    case CFG_SIZE:
        snprintf(out, outlen, "a size in bytes (k, M suffixes allowed) from %lld to %lld",
                 (long long)s->min, (long long)s->max);
        break;
    case CFG_DURATION: {
        char lo[32], hi[32];
        format_duration(s->min, lo, sizeof lo);
        format_duration(s->max, hi, sizeof hi);
        snprintf(out, outlen, "a duration (ms, s, m, h, d; bare number = ms) from %s to %s", lo,
                 hi);
        break;
    }
    case CFG_BOOL:
        snprintf(out, outlen, "true or false");
        break;
    case CFG_ENUM:
        snprintf(out, outlen, "one of %s", s->choices);
        break;
    case CFG_SET:
        snprintf(out, outlen, "a comma list of %s (at least one)", s->choices);
        break;
    case CFG_STRING:
    case CFG_URL:
        snprintf(out, outlen, "a string");
        break;
    }
}

static void report_bad(const struct cfg_setting *s, const char *source, const char *value)
{
    char allowed[160], flag[64];
    describe_allowed(s, allowed, sizeof allowed);
    flag_of(s, flag, sizeof flag);
    if (s->secret)
        fprintf(stderr, "ticketd: invalid value for %s (%s, from %s; value hidden): must be %s\n",
                s->env, flag, source, allowed);
    else
        fprintf(stderr, "ticketd: invalid value for %s (%s, from %s): \"%s\": must be %s\n",
                s->env, flag, source, value, allowed);
}

/* Parses value into the field of row s; on failure reports (naming source) and returns -1. */
static int apply(struct cfg *c, const struct cfg_setting *s, const char *value, const char *source)
{
    char *field = (char *)c + s->offset;
    int64_t v;
    bool b;

    switch (s->type) {
    case CFG_INT:
    case CFG_SIZE:
        if ((s->type == CFG_INT ? parse_i64(value, &v) : parse_size(value, &v)) || v < s->min ||
            v > s->max)
            goto bad;
        *(int *)field = (int)v;
        return 0;
    case CFG_DURATION:
        if (parse_duration(value, &v) || v < s->min || v > s->max) goto bad;
        *(int64_t *)field = v;
        return 0;
    case CFG_BOOL:
        if (parse_bool(value, &b)) goto bad;
        *(bool *)field = b;
        return 0;
    case CFG_ENUM:
        if (!in_choices(s->choices, value, strlen(value))) goto bad;
        break;
    case CFG_SET:
        if (check_set(s->choices, value)) goto bad;
        break;
    case CFG_STRING:
    case CFG_URL:
        break;
    }
    char *copy = strdup(value);
    if (!copy) {
        fprintf(stderr, "ticketd: out of memory\n");
        return -1;
    }
    free(*(char **)field);
    *(char **)field = copy;
    return 0;
bad:
    report_bad(s, source, value);
    return -1;
}

static const struct cfg_setting *find_flag(const char *name, size_t len)
{
    for (size_t i = 0; i < NSETTINGS; i++) {
        char flag[64];
        flag_of(&settings[i], flag, sizeof flag);
        if (strlen(flag + 2) == len && strncmp(flag + 2, name, len) == 0) return &settings[i];
    }
    return NULL;
}

void cfg_free(struct cfg *c)
{
    if (!c) return;
    for (size_t i = 0; i < NSETTINGS; i++) {
        const struct cfg_setting *s = &settings[i];
        if (s->type == CFG_STRING || s->type == CFG_URL || s->type == CFG_ENUM ||
            s->type == CFG_SET) {
            char **field = (char **)((char *)c + s->offset);
            free(*field);
            *field = NULL;
        }
    }
}

int cfg_load(struct cfg *c, int argc, char **argv, int *argi)
{
    memset(c, 0, sizeof *c);

    for (size_t i = 0; i < NSETTINGS; i++) {
        if (apply(c, &settings[i], settings[i].def, "default")) goto fail; /* a table bug */
    }
    for (size_t i = 0; i < NSETTINGS; i++) {
        const char *v = getenv(settings[i].env);
        /* An empty variable counts as unset, except for strings where empty is meaningful
         * (KAFKA_BROKERS= selects the mock, ADMIN_TOKEN= disables admin). */
        if (!v) continue;
        if (!*v && settings[i].type != CFG_STRING && settings[i].type != CFG_URL) continue;
        if (apply(c, &settings[i], v, "environment")) goto fail;
    }

    int i = argi ? *argi : 1;
    while (i < argc) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            fprintf(stdout, "usage: ticketd <command> [flags]  (`ticketd help` lists the commands)\n\n");
            cfg_print_help(stdout);
            cfg_free(c);
            if (argi) *argi = i;
            return 1;
        }
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
        }
        if (strncmp(arg, "--", 2) != 0) break; /* first non-flag argument */
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const struct cfg_setting *s = find_flag(name, nlen);
        if (!s) {
            fprintf(stderr, "ticketd: unknown flag --%.*s (see ticketd --help)\n", (int)nlen,
                    name);
            goto fail;
        }
        const char *value;
        if (eq) {
            value = eq + 1;
            i++;
        } else if (s->type == CFG_BOOL) {
            /* "--retry-exponential" alone means true; "... false" is accepted too. */
            bool ignored;
            if (i + 1 < argc && parse_bool(argv[i + 1], &ignored) == 0) {
                value = argv[i + 1];
                i += 2;
            } else {
                value = "true";
                i++;
            }
        } else {
            if (i + 1 >= argc) {
                fprintf(stderr, "ticketd: flag --%s needs a value\n", name);
                goto fail;
            }
            value = argv[i + 1];
            i += 2;
        }
        if (apply(c, s, value, "flag")) goto fail;
    }
    if (argi) *argi = i;

    c->role_api = set_has(c->role, "api");
    c->role_relay = set_has(c->role, "relay");
    c->role_consumer = set_has(c->role, "consumer");
    return 0;

fail:
    cfg_free(c);
    return -1;
}

/* ---- printing ---- */


/* The current value of a field as text; secrets as "***" (when set); URLs redacted.
 * Returns a malloc'd string. */
static char *value_text(const struct cfg *c, const struct cfg_setting *s)
{
    const char *field = (const char *)c + s->offset;
    char buf[64];
    switch (s->type) {
    case CFG_INT:
    case CFG_SIZE:
        snprintf(buf, sizeof buf, "%d", *(const int *)field);
        return strdup(buf);
    case CFG_DURATION:
        format_duration(*(const int64_t *)field, buf, sizeof buf);
        return strdup(buf);
    case CFG_BOOL:
        return strdup(*(const bool *)field ? "true" : "false");
    case CFG_URL:
        return cfg_redact_url(*(char *const *)field);
    case CFG_STRING:
    case CFG_ENUM:
    case CFG_SET: {
        const char *v = *(char *const *)field;
        if (!v) v = "";
        if (s->secret && *v) return strdup("***");
        return strdup(v);
    }
    }
    return strdup("");
}

void cfg_print_effective(const struct cfg *c, FILE *out)
{
    for (size_t i = 0; i < NSETTINGS; i++) {
        char *v = value_text(c, &settings[i]);
        fprintf(out, "%s=%s\n", settings[i].env, v ? v : "");
        free(v);
    }
}

static const char *type_hint(const struct cfg_setting *s)
{
    switch (s->type) {
    case CFG_INT: return "N";
    case CFG_SIZE: return "BYTES";
    case CFG_DURATION: return "DURATION";
    case CFG_BOOL: return "[BOOL]";
    case CFG_URL: return "URL";
    case CFG_ENUM:
    case CFG_SET:
    case CFG_STRING: return "STR";
    }
    return "";
}

static bool has_range(const struct cfg_setting *s)
{
    return s->type != CFG_STRING && s->type != CFG_URL;
}

void cfg_print_help(FILE *out)
{
    fprintf(out,
            "settings (flag, environment variable; precedence: default < environment < flag;\n"
            "flags go after the command, as --name value or --name=value; durations take\n"
            "ms, s, m, h, d suffixes, a bare number is milliseconds):\n");
    for (size_t i = 0; i < NSETTINGS; i++) {
        const struct cfg_setting *s = &settings[i];
        char flag[64], allowed[160];
        flag_of(s, flag, sizeof flag);
        fprintf(out, "  %s %s  (%s)\n", flag, type_hint(s), s->env);
        fprintf(out, "      %s\n", s->help);
        if (s->secret) fprintf(out, "      secret: never printed\n");
        fprintf(out, "      default: %s\n", *s->def ? s->def : "(empty)");
        if (has_range(s)) {
            describe_allowed(s, allowed, sizeof allowed);
            fprintf(out, "      allowed: %s\n", allowed);
        }
    }
}

void cfg_print_markdown(FILE *out)
{
    fprintf(out, "| Environment variable | Flag | Default | Allowed | Description |\n");
    fprintf(out, "|---|---|---|---|---|\n");
    for (size_t i = 0; i < NSETTINGS; i++) {
        const struct cfg_setting *s = &settings[i];
        char flag[64], allowed[160];
        flag_of(s, flag, sizeof flag);
        describe_allowed(s, allowed, sizeof allowed);
        fprintf(out, "| `%s` | `%s` | %s%s%s | %s | %s%s |\n", s->env, flag, *s->def ? "`" : "",
                *s->def ? s->def : "(empty)", *s->def ? "`" : "", allowed, s->help,
                s->secret ? " (secret)" : "");
    }
}

/* ---- redaction ---- */

static bool is_key_boundary(const char *start, const char *p)
{
    if (p == start) return true;
    char prev = p[-1];
    return isspace((unsigned char)prev) || prev == '?' || prev == '&' || prev == ';';
}

char *cfg_redact_url(const char *s)
{
    struct strbuf b = STRBUF_INIT;
    if (!s) s = "";

    const char *p = s;
    /* URL userinfo: scheme://user:password@host -> scheme://user:***@host */
    const char *scheme_end = strstr(s, "://");
    if (scheme_end) {
        const char *auth = scheme_end + 3;
        size_t auth_len = strcspn(auth, "/?#");
        const char *at = NULL;
        for (const char *q = auth; q < auth + auth_len; q++)
            if (*q == '@') at = q;
        if (at) {
            const char *colon = memchr(auth, ':', (size_t)(at - auth));
            if (colon) {
                if (strbuf_append(&b, s, (size_t)(colon + 1 - s)) || strbuf_append(&b, "***", 3)) goto oom;
                p = at;
            }
        }
    }

    /* "password=xyz" as a conninfo field or a URL query parameter. */
    while (*p) {
        if (strncasecmp(p, "password", 8) == 0 && is_key_boundary(s, p)) {
            const char *q = p + 8;
            while (*q == ' ' || *q == '\t') q++;
            if (*q == '=') {
                q++;
                while (*q == ' ' || *q == '\t') q++;
                if (strbuf_append(&b, p, (size_t)(q - p)) || strbuf_append(&b, "***", 3)) goto oom;
                if (*q == '\'') { /* quoted conninfo value, backslash escapes */
                    q++;
                    while (*q && *q != '\'') {
                        if (*q == '\\' && q[1]) q++;
                        q++;
                    }
                    if (*q == '\'') q++;
                } else {
                    while (*q && !isspace((unsigned char)*q) && *q != '&' && *q != '#') q++;
                }
                p = q;
                continue;
            }
        }
        if (strbuf_append(&b, p, 1)) goto oom;
        p++;
    }
    if (b.failed) goto oom;
    return strbuf_take(&b);
oom:
    strbuf_free(&b);
    return NULL;
}
