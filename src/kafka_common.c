/* kafka_common: rdkafka configuration from the settings, and the queue -> loop bridge. */
#include "kafka_common.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "limits.h"
#include "log.h"


static char *trim(char *s)
{
    while (*s && isspace((unsigned char)*s)) s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1])) end--;
    *end = '\0';
    return s;
}

/* Applies one "k=v" entry. rdkafka's own error text quotes the value, which may be a
 * secret (sasl.password), so the message is built here from the name only. */
static int apply_entry(rd_kafka_conf_t *conf, char *entry, int index, char *errstr,
                       size_t errlen)
{
    char *eq = strchr(entry, '=');
    if (!eq) {
        snprintf(errstr, errlen, "KAFKA_CONFIG: entry %d is not of the form name=value", index);
        return -1;
    }
    *eq = '\0';
    char *name = trim(entry);
    char *value = trim(eq + 1);
    char safe_name[KAFKA_PROP_NAME_MAX + 1];
    snprintf(safe_name, sizeof safe_name, "%s", name);
    for (char *p = safe_name; *p; p++)
        if (!isgraph((unsigned char)*p)) *p = '?';
    if (!*name) {
        snprintf(errstr, errlen, "KAFKA_CONFIG: entry %d has an empty property name", index);
        return -1;
    }
    char rderr[512];
    switch (rd_kafka_conf_set(conf, name, value, rderr, sizeof rderr)) {
    case RD_KAFKA_CONF_OK:
        return 0;
    case RD_KAFKA_CONF_UNKNOWN:
        snprintf(errstr, errlen, "KAFKA_CONFIG: unknown property \"%s\"", safe_name);
        return -1;
    default:
        snprintf(errstr, errlen, "KAFKA_CONFIG: invalid value for property \"%s\"", safe_name);
        return -1;
    }
}

rd_kafka_conf_t *kafka_conf_new(const char *brokers, const char *extra_config, char *errstr,
                                size_t errlen)
{
    char rderr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char *copy = NULL;

    if (errlen) errstr[0] = '\0';
    if (brokers && *brokers &&
        rd_kafka_conf_set(conf, "bootstrap.servers", brokers, rderr, sizeof rderr) !=
            RD_KAFKA_CONF_OK) {
        snprintf(errstr, errlen, "invalid value for property \"bootstrap.servers\"");
        goto fail;
    }
    if (!extra_config || !*extra_config) return conf;

    copy = strdup(extra_config);
    if (!copy) {
        snprintf(errstr, errlen, "out of memory");
        goto fail;
    }
    /* A list that has newlines is split on newlines only, so a value may hold commas
     * (ssl.cipher.suites, sasl.oauthbearer.config); otherwise entries are comma separated. */
    const char *seps = strchr(copy, '\n') ? "\n" : ",";
    int index = 0;
    char *save = NULL;
    for (char *tok = strtok_r(copy, seps, &save); tok; tok = strtok_r(NULL, seps, &save)) {
        char *entry = trim(tok);
        if (!*entry || *entry == '#') continue;
        index++;
        if (apply_entry(conf, entry, index, errstr, errlen) != 0) goto fail;
    }
    free(copy);
    return conf;

fail:
    free(copy);
    rd_kafka_conf_destroy(conf);
    return NULL;
}

struct kafka_bridge {
    uv_poll_t poll;
    int fds[2]; /* [0] read end watched by poll, [1] write end given to rdkafka */
    rd_kafka_queue_t *q;
    void (*on_ready)(void *ud);
    void *ud;
    bool closing;
};

static void bridge_on_readable(uv_poll_t *h, int status, int events)
{
    struct kafka_bridge *b = h->data;
    char buf[256];

    if (b->closing) return;
    /* Drain the wake-up bytes first: an event enqueued after this point writes a new byte,
     * so none is missed between the drain and on_ready's poll loop. */
    for (;;) {
        ssize_t n = read(b->fds[0], buf, sizeof buf);
        if (n > 0) continue;
        if (n < 0 && errno == EINTR) continue;
        break;
    }
    if (status < 0) log_warn("kafka", "event=bridge_poll_error err=%s", uv_strerror(status));
    b->on_ready(b->ud);
}

static void bridge_on_close(uv_handle_t *h)
{
    struct kafka_bridge *b = h->data;
    close(b->fds[0]);
    close(b->fds[1]);
    free(b);
}

int kafka_bridge_start(struct kafka_bridge **out, uv_loop_t *loop, rd_kafka_queue_t *q,
                       void (*on_ready)(void *ud), void *ud)
{
    struct kafka_bridge *b = calloc(1, sizeof *b);
    int rc;

    if (!b) return -ENOMEM;
    if (pipe2(b->fds, O_NONBLOCK | O_CLOEXEC) != 0) {
        rc = -errno;
        free(b);
        return rc;
    }
    b->q = q;
    b->on_ready = on_ready;
    b->ud = ud;
    rc = uv_poll_init(loop, &b->poll, b->fds[0]);
    if (rc != 0) {
        close(b->fds[0]);
        close(b->fds[1]);
        free(b);
        return rc;
    }
    b->poll.data = b;
    rc = uv_poll_start(&b->poll, UV_READABLE, bridge_on_readable);
    if (rc != 0) {
        b->closing = true; /* the handle is live: free it from its close callback */
        uv_close((uv_handle_t *)&b->poll, bridge_on_close);
        return rc;
    }
    rd_kafka_queue_io_event_enable(q, b->fds[1], "1", 1);
    /* Events queued before the io event was enabled wrote nothing: wake once now. */
    ssize_t w = write(b->fds[1], "1", 1);
    (void)w;
    *out = b;
    return 0;
}

void kafka_bridge_close(struct kafka_bridge *b)
{
    if (!b || b->closing) return;
    b->closing = true;
    /* rdkafka threads must stop writing to the pipe before it is closed. */
    rd_kafka_queue_io_event_enable(b->q, -1, NULL, 0);
    uv_poll_stop(&b->poll);
    uv_close((uv_handle_t *)&b->poll, bridge_on_close);
}

/* ---- producer guarantees and logging ---- */

static bool extra_sets(const char *extra_config, const char *prop)
{
    return extra_config && strstr(extra_config, prop);
}

int kafka_conf_idempotent_producer(rd_kafka_conf_t *conf, const char *extra_config,
                                   const char *client_id, char *errstr, size_t errlen)
{
    const char *kv[4][2] = {{"enable.idempotence", "true"}, {"acks", "all"}};
    size_t n = 2;
    if (!extra_sets(extra_config, "linger.ms") && !extra_sets(extra_config, "queue.buffering.max.ms"))
        kv[n][0] = "linger.ms", kv[n++][1] = "5";
    if (client_id) kv[n][0] = "client.id", kv[n++][1] = client_id;
    for (size_t i = 0; i < n; i++) {
        char rderr[512];
        if (rd_kafka_conf_set(conf, kv[i][0], kv[i][1], rderr, sizeof rderr) != RD_KAFKA_CONF_OK) {
            snprintf(errstr, errlen, "producer configuration: invalid value for property \"%s\"",
                     kv[i][0]);
            return -1;
        }
    }
    return 0;
}

int kafka_log_level(int syslog_level)
{
    return syslog_level <= 3 ? LOG_ERROR : syslog_level == 4 ? LOG_WARN
         : syslog_level <= 6 ? LOG_INFO : LOG_DEBUG;
}

void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    char quoted[512];
    log_quote(buf, quoted, sizeof quoted);
    log_at(kafka_log_level(level), "rdkafka", "event=log client=%s fac=%s msg=%s",
           rk ? rd_kafka_name(rk) : "-", fac, quoted);
}

void kafka_conf_log_to_ours(rd_kafka_conf_t *conf)
{
    rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
}

bool kafka_stats_broker_up(const char *stats_json)
{
    json_object *root = json_tokener_parse(stats_json);
    json_object *brokers;
    bool up = false;
    if (!root) return false;
    if (json_object_object_get_ex(root, "brokers", &brokers) &&
        json_object_is_type(brokers, json_type_object)) {
        json_object_object_foreach(brokers, name, b) {
            json_object *nodeid, *state;
            (void)name;
            if (json_object_object_get_ex(b, "nodeid", &nodeid) &&
                json_object_get_int(nodeid) >= 0 &&
                json_object_object_get_ex(b, "state", &state) &&
                strcmp(json_object_get_string(state), "UP") == 0)
                up = true;
        }
    }
    json_object_put(root);
    return up;
}
