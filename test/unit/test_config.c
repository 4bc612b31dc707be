/* Unit tests of config.c: defaults, environment, flags, precedence, rejected values (with the
 * allowed range in the message), durations, role parsing, redaction and the printers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "check.h"


static const char *const all_env[] = {
    "DATABASE_URL", "KAFKA_BROKERS", "KAFKA_CONFIG", "KAFKA_PARTITIONS", "KAFKA_TOPIC",
    "KAFKA_DLQ_TOPIC", "CONSUMER_GROUP", "LISTEN", "ADMIN_TOKEN", "DATA_PLATFORM_URL",
    "SMTP_URL", "MAIL_FROM", "ROLE", "DB_POOL", "BATCH_MAX", "QUEUE_MAX", "MAX_CONNECTIONS",
    "MAX_HEADER_BYTES", "MAX_HEADERS", "MAX_BODY_BYTES", "IDLE_TIMEOUT", "HEADER_TIMEOUT",
    "SHUTDOWN_GRACE", "IDEMPOTENCY_KEY_TTL", "RELAY_INTERVAL", "RELAY_BATCH", "RELAY_INFLIGHT_MAX",
    "RELAY_RETRY_BACKOFF", "OUTBOX_RETENTION", "RETRY_MAX_ATTEMPTS", "RETRY_BACKOFF",
    "RETRY_EXPONENTIAL", "POINTS_PER_APPLICATION", "SINK_TIMEOUT", "AUDIT_GRACE", "LOG_LEVEL", "LOG_BUFFER",
};

static void clear_env(void)
{
    for (size_t i = 0; i < sizeof all_env / sizeof all_env[0]; i++) unsetenv(all_env[i]);
}

/* Runs cfg_load on a NULL-terminated argument list (after a fake "serve"), capturing what it
 * writes to stderr into errbuf. Returns cfg_load's result; *argi_out is where it stopped. */
static char errbuf[4096];

static int load(struct cfg *c, const char *const *args, int *argi_out)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = "serve";
    for (; args && *args; args++) argv[argc++] = (char *)*args;
    argv[argc] = NULL;

    fflush(stderr);
    int saved = dup(2);
    FILE *tmp = tmpfile();
    dup2(fileno(tmp), 2);
    int argi = 1;
    int rc = cfg_load(c, argc, argv, &argi);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(tmp);
    size_t n = fread(errbuf, 1, sizeof errbuf - 1, tmp);
    while (n > 0 && errbuf[n - 1] == '\n') n--;
    errbuf[n] = '\0';
    fclose(tmp);
    if (argi_out) *argi_out = argi;
    return rc;
}

static void test_defaults(void)
{
    struct cfg c;
    clear_env();
    int rc = load(&c, NULL, NULL);
    CHECK(rc == 0, "defaults load");
    CHECK(strcmp(c.database_url, "postgresql:///ticketd") == 0, "DATABASE_URL default");
    CHECK(strcmp(c.listen, "0.0.0.0:8080") == 0, "LISTEN default");
    CHECK(strcmp(c.kafka_brokers, "") == 0, "KAFKA_BROKERS default empty");
    CHECK(c.kafka_partitions == 12, "KAFKA_PARTITIONS 12");
    CHECK(strcmp(c.topic, "ticket-applied") == 0, "KAFKA_TOPIC default");
    CHECK(strcmp(c.dlq_topic, "ticket-applied.DLQ") == 0, "KAFKA_DLQ_TOPIC default");
    CHECK(strcmp(c.consumer_group, "ticket-consumer-group") == 0, "CONSUMER_GROUP default");
    CHECK(strcmp(c.admin_token, "") == 0, "ADMIN_TOKEN default empty");
    CHECK(c.db_pool == 4, "DB_POOL 4");
    CHECK(c.batch_max == 512, "BATCH_MAX 512");
    CHECK(c.queue_max == 20000, "QUEUE_MAX 20000");
    CHECK(c.max_connections == 10000, "MAX_CONNECTIONS 10000");
    CHECK(c.max_header_bytes == 8192, "MAX_HEADER_BYTES 8192");
    CHECK(c.max_headers == 64, "MAX_HEADERS 64");
    CHECK(c.max_body_bytes == 16384, "MAX_BODY_BYTES 16384");
    CHECK(c.idle_timeout_ms == 60000, "IDLE_TIMEOUT 60s");
    CHECK(c.header_timeout_ms == 10000, "HEADER_TIMEOUT 10s");
    CHECK(c.shutdown_grace_ms == 20000, "SHUTDOWN_GRACE 20s");
    CHECK(c.relay_interval_ms == 1000, "RELAY_INTERVAL 1s");
    CHECK(c.relay_batch == 1000, "RELAY_BATCH 1000");
    CHECK(c.relay_inflight_max == 20000, "RELAY_INFLIGHT_MAX 20000");
    CHECK(c.relay_retry_backoff_ms == 500, "RELAY_RETRY_BACKOFF 500ms");
    CHECK(c.outbox_retention_ms == 7LL * 24 * 3600 * 1000, "OUTBOX_RETENTION 7d");
    CHECK(c.retry_max_attempts == 3, "RETRY_MAX_ATTEMPTS 3");
    CHECK(c.retry_backoff_ms == 1000, "RETRY_BACKOFF 1s");
    CHECK(!c.retry_exponential, "RETRY_EXPONENTIAL false");
    CHECK(c.points_per_application == 100, "POINTS_PER_APPLICATION 100");
    CHECK(c.http_timeout_ms == 5000, "SINK_TIMEOUT 5s");
    CHECK(c.audit_grace_ms == 10000, "AUDIT_GRACE 10s");
    CHECK(strcmp(c.log_level, "info") == 0, "LOG_LEVEL info");
    CHECK(strcmp(c.role, "api,relay,consumer") == 0, "ROLE default");
    CHECK(c.role_api && c.role_relay && c.role_consumer, "default role enables all three");
    CHECK(c.idempotency_key_ttl_ms == 24LL * 3600 * 1000, "IDEMPOTENCY_KEY_TTL 24h");
    cfg_free(&c);
    CHECK(c.database_url == NULL && c.listen == NULL, "cfg_free clears strings");
}

static void test_env_flags_precedence(void)
{
    struct cfg c;
    clear_env();
    setenv("BATCH_MAX", "64", 1);
    setenv("LISTEN", "127.0.0.1:0", 1);
    setenv("IDLE_TIMEOUT", "2m", 1);
    setenv("RETRY_EXPONENTIAL", "yes", 1);
    int rc = load(&c, NULL, NULL);
    CHECK(rc == 0 && c.batch_max == 64, "env BATCH_MAX=64");
    CHECK(rc == 0 && strcmp(c.listen, "127.0.0.1:0") == 0, "env LISTEN");
    CHECK(rc == 0 && c.idle_timeout_ms == 120000, "env IDLE_TIMEOUT=2m");
    CHECK(rc == 0 && c.retry_exponential, "env RETRY_EXPONENTIAL=yes");
    cfg_free(&c);

    const char *a1[] = {"--batch-max", "1", "--listen=127.0.0.1:9999", NULL};
    rc = load(&c, a1, NULL);
    CHECK(rc == 0 && c.batch_max == 1, "flag beats env (--batch-max 1)");
    CHECK(rc == 0 && strcmp(c.listen, "127.0.0.1:9999") == 0, "--listen=value form");
    CHECK(rc == 0 && c.idle_timeout_ms == 120000, "env still applies where no flag");
    cfg_free(&c);

    const char *a2[] = {"--retry-exponential", "--db-pool", "8", "extra", "--x", NULL};
    int argi = 0;
    rc = load(&c, a2, &argi);
    CHECK(rc == 0 && c.retry_exponential, "bare bool flag means true");
    CHECK(rc == 0 && c.db_pool == 8, "--db-pool 8");
    CHECK(argi == 4, "stops at the first non-flag argument (argi=%d)", argi);
    cfg_free(&c);
    const char *a3[] = {"--retry-exponential", "false", NULL};
    rc = load(&c, a3, NULL);
    CHECK(rc == 0 && !c.retry_exponential, "bool flag with explicit value");
    cfg_free(&c);
    /* issue 12: acknowledging without a database is a separate bench binary, not a setting */
    const char *a4[] = {"--canned", NULL};
    rc = load(&c, a4, NULL);
    CHECK(rc == -1 && strstr(errbuf, "unknown flag --canned"), "--canned is not a ticketd flag");
    if (rc == 0) cfg_free(&c);

    setenv("ADMIN_TOKEN", "", 1);
    setenv("DB_POOL", "", 1);
    rc = load(&c, NULL, NULL);
    CHECK(rc == 0 && c.db_pool == 4, "empty numeric env var counts as unset");
    CHECK(rc == 0 && strcmp(c.admin_token, "") == 0, "empty string env var accepted");
    cfg_free(&c);
    clear_env();
}

static void expect_bad_env(const char *env, const char *value, const char *must_contain)
{
    struct cfg c;
    clear_env();
    setenv(env, value, 1);
    int rc = load(&c, NULL, NULL);
    CHECK(rc == -1 && strstr(errbuf, env) && strstr(errbuf, must_contain),
          "%s=\"%s\" rejected, message mentions \"%s\" (%s)", env, value, must_contain, errbuf);
    clear_env();
}

static void test_bad_values(void)
{
    expect_bad_env("BATCH_MAX", "0", "from 1 to 10000");
    expect_bad_env("BATCH_MAX", "abc", "\"abc\"");
    expect_bad_env("BATCH_MAX", "12x", "integer");
    expect_bad_env("BATCH_MAX", " 5", "integer");
    expect_bad_env("BATCH_MAX", "99999999999999999999", "integer");
    expect_bad_env("DB_POOL", "-1", "from 1 to 256");
    expect_bad_env("IDLE_TIMEOUT", "5 s", "duration");
    expect_bad_env("IDLE_TIMEOUT", "5w", "duration");
    expect_bad_env("IDLE_TIMEOUT", "2d", "from 1ms to 1d");
    expect_bad_env("RETRY_EXPONENTIAL", "maybe", "true or false");
    expect_bad_env("LOG_LEVEL", "verbose", "debug,info,warn,error");
    expect_bad_env("ROLE", "api,web", "api,relay,consumer");

    /* A secret's value is never echoed. */
    struct cfg c;
    clear_env();
    const char *a[] = {"--kafka-config", "sasl.password=hunter2", "--batch-max", "0", NULL};
    int rc = load(&c, a, NULL);
    CHECK(rc == -1 && strstr(errbuf, "BATCH_MAX") && strstr(errbuf, "--batch-max") &&
              strstr(errbuf, "flag"),
          "bad flag names setting, flag and source (%s)", errbuf);
    CHECK(!strstr(errbuf, "hunter2"), "secret not echoed by unrelated error");

    const char *unknown[] = {"--no-such-flag", "1", NULL};
    rc = load(&c, unknown, NULL);
    CHECK(rc == -1 && strstr(errbuf, "unknown flag --no-such-flag"), "unknown flag rejected");

    const char *missing[] = {"--batch-max", NULL};
    rc = load(&c, missing, NULL);
    CHECK(rc == -1 && strstr(errbuf, "needs a value"), "flag without value rejected");

    setenv("KAFKA_PARTITIONS", "0", 1);
    rc = load(&c, NULL, NULL);
    CHECK(rc == -1 && strstr(errbuf, "environment"), "env error names the environment source");
    clear_env();
}

static void test_durations_roles_sizes(void)
{
    struct {
        const char *in;
        long long ms;
    } d[] = {{"250", 250},       {"250ms", 250},        {"3s", 3000},
             {"2m", 120000},     {"1h", 3600000},       {"1d", 86400000}};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) {
        struct cfg c;
        clear_env();
        setenv("IDLE_TIMEOUT", d[i].in, 1);
        int rc = load(&c, NULL, NULL);
        CHECK(rc == 0 && c.idle_timeout_ms == d[i].ms, "duration \"%s\" = %lld ms", d[i].in,
              d[i].ms);
        if (rc == 0) cfg_free(&c);
    }
    struct cfg c;
    clear_env();
    setenv("OUTBOX_RETENTION", "30d", 1);
    int rc = load(&c, NULL, NULL);
    CHECK(rc == 0 && c.outbox_retention_ms == 30LL * 86400000, "OUTBOX_RETENTION=30d");
    cfg_free(&c);

    setenv("ROLE", "relay", 1);
    rc = load(&c, NULL, NULL);
    CHECK(rc == 0 && !c.role_api && c.role_relay && !c.role_consumer, "ROLE=relay");
    cfg_free(&c);
    setenv("ROLE", "api, consumer", 1);
    rc = load(&c, NULL, NULL);
    CHECK(rc == 0 && c.role_api && !c.role_relay && c.role_consumer, "ROLE=\"api, consumer\"");
    cfg_free(&c);
    setenv("ROLE", "api,,relay", 1);
    rc = load(&c, NULL, NULL);
    CHECK(rc == -1, "ROLE with an empty item rejected");

    clear_env();
    setenv("MAX_BODY_BYTES", "32k", 1);
    rc = load(&c, NULL, NULL);
    CHECK(rc == 0 && c.max_body_bytes == 32768, "MAX_BODY_BYTES=32k");
    cfg_free(&c);
    clear_env();
}

static void test_redaction(void)
{
    struct {
        const char *in, *out;
    } r[] = {
        {"postgresql://user:pass@host/db", "postgresql://user:***@host/db"},
        {"postgresql://user:p%40ss@host:5432/db?sslmode=require",
         "postgresql://user:***@host:5432/db?sslmode=require"},
        {"postgresql://user@host/db", "postgresql://user@host/db"},
        {"postgresql:///ticketd", "postgresql:///ticketd"},
        {"host=/tmp port=5432 user=postgres password=xyz dbname=t",
         "host=/tmp port=5432 user=postgres password=*** dbname=t"},
        {"password='a b\\' c' host=x", "password=*** host=x"},
        {"postgresql://h/db?user=u&password=secret&sslmode=disable",
         "postgresql://h/db?user=u&password=***&sslmode=disable"},
        {"smtp://mailer:s3cret@smtp.example.com:587", "smtp://mailer:***@smtp.example.com:587"},
        {"", ""},
    };
    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++) {
        char *out = cfg_redact_url(r[i].in);
        CHECK(out && strcmp(out, r[i].out) == 0, "redact \"%s\" -> \"%s\" (got \"%s\")", r[i].in,
              r[i].out, out ? out : "(null)");
        free(out);
    }
}

static void test_printers(void)
{
    struct cfg c;
    clear_env();
    setenv("DATABASE_URL", "postgresql://app:topsecret@db/ticketd", 1);
    setenv("ADMIN_TOKEN", "admintok123", 1);
    setenv("KAFKA_CONFIG", "sasl.password=kpass", 1);
    int rc = load(&c, NULL, NULL);
    CHECK(rc == 0, "load with secrets");

    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    cfg_print_effective(&c, mem);
    fclose(mem);
    CHECK(strstr(text, "DATABASE_URL=postgresql://app:***@db/ticketd\n") != NULL,
          "effective config redacts URL password");
    CHECK(strstr(text, "ADMIN_TOKEN=***\n") != NULL, "effective config hides ADMIN_TOKEN");
    CHECK(strstr(text, "KAFKA_CONFIG=***\n") != NULL, "effective config hides KAFKA_CONFIG");
    CHECK(!strstr(text, "topsecret") && !strstr(text, "admintok123") && !strstr(text, "kpass"),
          "no secret value anywhere in the effective config");
    CHECK(strstr(text, "BATCH_MAX=512\n") && strstr(text, "OUTBOX_RETENTION=7d\n") &&
              strstr(text, "RELAY_RETRY_BACKOFF=500ms\n"),
          "effective config shows values and durations");
    free(text);
    cfg_free(&c);

    mem = open_memstream(&text, &len);
    cfg_print_markdown(mem);
    fclose(mem);
    CHECK(strncmp(text, "| Environment variable |", 24) == 0, "markdown table header");
    CHECK(strstr(text, "| `BATCH_MAX` | `--batch-max` | `512` |") != NULL, "markdown BATCH_MAX row");
    CHECK(strstr(text, "`LISTEN`") && strstr(text, "`0.0.0.0:8080`"), "markdown LISTEN row");
    free(text);

    mem = open_memstream(&text, &len);
    cfg_print_help(mem);
    fclose(mem);
    CHECK(strstr(text, "--shutdown-grace") && strstr(text, "SHUTDOWN_GRACE") &&
              strstr(text, "default: 20s"),
          "help lists flag, env and default");
    free(text);
    clear_env();
}

int main(void)
{
    test_defaults();
    test_env_flags_precedence();
    test_bad_values();
    test_durations_roles_sizes();
    test_redaction();
    test_printers();
    return CHECK_SUMMARY();
}
