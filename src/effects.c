/* effects: points (PostgreSQL), data platform (HTTP), e-mail (SMTP) per event. The order
 * and why a crash anywhere is safe are in effects.h. */
#include "effects.h"

#include <errno.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "db_pool.h"
#include "http_client.h"
#include "kafka_common.h"
#include "log.h"
#include "metrics.h"

/* A logfmt-quoted copy of s in buf (free-form texts: remote replies, libpq errors). */
static const char *lq(const char *s, char *buf, size_t n)
{
    log_quote(s ? s : "", buf, n);
    return buf;
}

struct effects {
    uv_loop_t *loop;
    const struct cfg *cfg;
    char *group;
    struct dbp *db;
    struct hc *hc;
    unsigned inflight;
    bool stopped;
};

enum stage { ST_POINTS, ST_DATA_PLATFORM, ST_EMAIL };

struct run {
    struct effects *fx;
    struct effects_event ev;
    effects_done_fn cb;
    void *ud;
    bool want_dp, want_email;
    bool dp_done, email_done;
    bool points_granted;
    enum stage stage;
    /* the failure being recorded on the effect's row, reported after the write */
    const char *fail_class;
    char fail_msg[512];
};

/* Step 1, one statement: the processed_events row, the points grant only when that row is
 * new, the effect rows (points done), and which external effects were done before.
 * Data-modifying CTEs run to completion even though the outer SELECT does not read them;
 * the outer SELECT sees the table as it was before the statement. */
static const char points_sql[] =
    "WITH pe AS ("
    "  INSERT INTO processed_events (event_id, consumer_group, topic, partition, \"offset\")"
    "  VALUES ($1::uuid, $2, $3, $4::int, $5::bigint)"
    "  ON CONFLICT (event_id) DO NOTHING RETURNING event_id),"
    " pl AS ("
    "  INSERT INTO points_ledger (event_id, application_id, phone, points)"
    "  SELECT event_id, $6::bigint, $7, $8::int FROM pe"
    "  ON CONFLICT (event_id) DO NOTHING RETURNING event_id),"
    " ef AS ("
    "  INSERT INTO event_effects AS e (event_id, effect, application_id, done, attempts)"
    "  SELECT $1::uuid, w, $6::bigint, w = 'points', (w = 'points')::int"
    "  FROM unnest($9::text[]) AS w"
    "  ON CONFLICT (event_id, effect) DO UPDATE"
    "  SET done = true, attempts = e.attempts + 1, last_error = NULL, updated_at = now()"
    "  WHERE e.effect = 'points' AND NOT e.done RETURNING 1)"
    " SELECT (SELECT count(*) FROM pl),"
    "  EXISTS (SELECT 1 FROM event_effects WHERE event_id = $1::uuid"
    "          AND effect = 'data_platform' AND done),"
    "  EXISTS (SELECT 1 FROM event_effects WHERE event_id = $1::uuid"
    "          AND effect = 'email' AND done)";

static const char mark_sql[] =
    "UPDATE event_effects SET attempts = attempts + 1, done = $3::boolean, last_error = $4,"
    " updated_at = now() WHERE event_id = $1::uuid AND effect = $2";

/* ---- parsing ---- */

bool effects_is_uuid(const char *s, size_t len)
{
    if (!s || len != UUID_STR_LEN) return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-') return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return false;
        }
    }
    return true;
}

static bool has_control(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return true;
    return false;
}

static int copy_string(json_object *obj, const char *key, bool required, char *out,
                       size_t outlen, char *err, size_t errlen)
{
    json_object *v;
    out[0] = '\0';
    if (!json_object_object_get_ex(obj, key, &v) || v == NULL) {
        if (!required) return 0;
        snprintf(err, errlen, "value.%s is missing", key);
        return -1;
    }
    if (!json_object_is_type(v, json_type_string)) {
        snprintf(err, errlen, "value.%s is not a string", key);
        return -1;
    }
    const char *s = json_object_get_string(v);
    size_t len = (size_t)json_object_get_string_len(v);
    if (len >= outlen || has_control(s, len) || memchr(s, '\0', len)) {
        snprintf(err, errlen, "value.%s is too long or holds control characters", key);
        return -1;
    }
    memcpy(out, s, len);
    out[len] = '\0';
    return 0;
}

int effects_parse(const char *ce_id, size_t ce_id_len, const char *ce_time, size_t ce_time_len,
                  const char *value, size_t value_len, struct effects_event *out, char *err,
                  size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!ce_id) {
        snprintf(err, errlen, "missing %s header", CE_ID);
        return -1;
    }
    if (!effects_is_uuid(ce_id, ce_id_len)) {
        snprintf(err, errlen, "%s header is not a UUID", CE_ID);
        return -1;
    }
    memcpy(out->event_id, ce_id, ce_id_len);
    out->event_id[ce_id_len] = '\0';
    if (ce_time && ce_time_len < sizeof out->ce_time && !has_control(ce_time, ce_time_len)) {
        memcpy(out->ce_time, ce_time, ce_time_len);
        out->ce_time[ce_time_len] = '\0';
    }
    if (!value || value_len == 0) {
        snprintf(err, errlen, "empty value");
        return -1;
    }
    if (value_len > INT32_MAX) {
        snprintf(err, errlen, "value too large");
        return -1;
    }

    int rc = -1;
    struct json_tokener *tok = json_tokener_new();
    if (!tok) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    json_object *obj = json_tokener_parse_ex(tok, value, (int)value_len);
    size_t end = obj ? json_tokener_get_parse_end(tok) : 0;
    while (end < value_len && (value[end] == ' ' || value[end] == '\t' || value[end] == '\r' ||
                               value[end] == '\n'))
        end++;
    if (!obj || end != value_len) {
        snprintf(err, errlen, "value is not JSON");
        goto out;
    }
    if (!json_object_is_type(obj, json_type_object)) {
        snprintf(err, errlen, "value is not a JSON object");
        goto out;
    }
    json_object *v;
    if (!json_object_object_get_ex(obj, "id", &v) || !json_object_is_type(v, json_type_int) ||
        json_object_get_int64(v) <= 0) {
        snprintf(err, errlen, "value.id is not a positive integer");
        goto out;
    }
    out->application_id = json_object_get_int64(v);
    if (copy_string(obj, "event_id", true, out->ticket_event, sizeof out->ticket_event, err,
                    errlen) != 0)
        goto out;
    if (copy_string(obj, "phone", true, out->phone, sizeof out->phone, err, errlen) != 0)
        goto out;
    for (const char *p = out->phone; *p; p++) {
        if (*p < '0' || *p > '9') {
            snprintf(err, errlen, "value.phone is not digits");
            goto out;
        }
    }
    if (!out->phone[0]) {
        snprintf(err, errlen, "value.phone is empty");
        goto out;
    }
    if (copy_string(obj, "email", false, out->email, sizeof out->email, err, errlen) != 0)
        goto out;
    if (out->email[0] && (!strchr(out->email, '@') || strpbrk(out->email, " <>"))) {
        snprintf(err, errlen, "value.email is not an address");
        goto out;
    }
    out->value = value;
    out->value_len = value_len;
    rc = 0;
out:
    if (obj) json_object_put(obj);
    json_tokener_free(tok);
    return rc;
}

/* ---- runs ---- */

int effects_create(struct effects **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *consumer_group, struct dbp *db, struct hc *hc)
{
    struct effects *fx = calloc(1, sizeof *fx);
    if (!fx) return -ENOMEM;
    fx->group = strdup(consumer_group);
    if (!fx->group) {
        free(fx);
        return -ENOMEM;
    }
    fx->loop = loop;
    fx->cfg = cfg;
    fx->db = db;
    fx->hc = hc;
    metrics_describe("ticketd_sink_failures_total", "counter",
                     "failed follow-up effect attempts, by effect");
    metrics_describe("ticketd_points_granted_total", "counter",
                     "points_ledger rows inserted (exactly one per event)");
    *out = fx;
    return 0;
}

void effects_stop(struct effects *fx)
{
    fx->stopped = true;
}

unsigned effects_inflight(const struct effects *fx)
{
    return fx->inflight;
}

void effects_free(struct effects *fx)
{
    if (!fx) return;
    free(fx->group);
    free(fx);
}

static void run_finish(struct run *r, const char *error_class, const char *message)
{
    struct effects_outcome o = {
        .ok = error_class == NULL,
        .error_class = error_class,
        .error_message = message,
        .points_granted = r->points_granted,
    };
    r->fx->inflight--;
    r->cb(r->ud, &o);
    free(r);
}

static void run_next(struct run *r);

static const char *stage_effect(enum stage s)
{
    return s == ST_DATA_PLATFORM ? "data_platform" : s == ST_EMAIL ? "email" : "points";
}

/* The done/failed mark of an external effect committed (or could not be written). */
static void on_marked(void *ud, const PGresult *res, const char *error)
{
    char qb[600];
    struct run *r = ud;
    bool written = res && PQresultStatus(res) == PGRES_COMMAND_OK;

    if (r->fail_class) {
        if (!written)
            log_warn("effects", "event=mark_failed_error event_id=%s effect=%s err=%s",
                     r->ev.event_id, stage_effect(r->stage),
                     lq(error ? error : PQresultErrorMessage(res), qb, sizeof qb));
        run_finish(r, r->fail_class, r->fail_msg);
        return;
    }
    if (!written) {
        /* The effect happened but its done mark did not commit: this attempt fails and the
         * retry sends it again under the same idempotency key. */
        snprintf(r->fail_msg, sizeof r->fail_msg, "recording %s done: %s",
                 stage_effect(r->stage), error ? error : PQresultErrorMessage(res));
        run_finish(r, "db", r->fail_msg);
        return;
    }
    if (r->stage == ST_DATA_PLATFORM) r->dp_done = true;
    else if (r->stage == ST_EMAIL) r->email_done = true;
    run_next(r);
}

/* Keeps printable ASCII only: error texts quote remote replies, and PostgreSQL text (and a
 * Kafka header read by humans) must not carry invalid UTF-8 or control bytes. */
static void ascii_only(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) *s = '?';
}

/* Records the outcome of the current external effect on its row, then continues. */
static void mark(struct run *r, bool done, const char *error_class, const char *message)
{
    char qb[600];
    const char *effect = stage_effect(r->stage);
    if (!done) {
        r->fail_class = error_class;
        snprintf(r->fail_msg, sizeof r->fail_msg, "%s: %s", effect, message);
        ascii_only(r->fail_msg);
        char labels[64];
        snprintf(labels, sizeof labels, "effect=\"%s\"", effect);
        if (strcmp(error_class, "closing") != 0) /* shutdown aborts are not sink failures */
            metrics_counter_add("ticketd_sink_failures_total", labels, 1);
        log_warn("effects", "event=effect_failed event_id=%s effect=%s class=%s err=%s",
                 r->ev.event_id, effect, error_class, lq(message, qb, sizeof qb));
    }
    const char *params[4] = {r->ev.event_id, effect, done ? "true" : "false",
                             done ? NULL : r->fail_msg};
    if (dbp_query(r->fx->db, mark_sql, 4, params, on_marked, r) != 0) {
        if (done) {
            snprintf(r->fail_msg, sizeof r->fail_msg, "recording %s done: database unavailable",
                     effect);
            run_finish(r, "db", r->fail_msg);
        } else {
            run_finish(r, r->fail_class, r->fail_msg);
        }
    }
}

static void on_http_done(void *ud, const struct hc_result *res)
{
    struct run *r = ud;
    char msg[384];

    if (res->curl_code != 0) {
        snprintf(msg, sizeof msg, "%s", res->error);
        mark(r, false, strcmp(res->error, "closing") == 0 ? "closing" : "sink_transport", msg);
        return;
    }
    if (res->status < 200 || res->status > 299) {
        char body[128];
        log_quote(res->body, body, sizeof body);
        snprintf(msg, sizeof msg, "HTTP %ld %s", res->status, body);
        mark(r, false, "sink_status", msg);
        return;
    }
    mark(r, true, NULL, NULL);
}

static void on_smtp_done(void *ud, const struct hc_result *res)
{
    struct run *r = ud;
    char msg[384];

    if (res->curl_code != 0) {
        snprintf(msg, sizeof msg, "%s (reply %ld)", res->error, res->status);
        mark(r, false, strcmp(res->error, "closing") == 0 ? "closing" : "smtp", msg);
        return;
    }
    mark(r, true, NULL, NULL);
}

/* The CloudEvent in structured mode: the attributes plus the application as data. */
static char *cloudevent_json(const struct run *r, size_t *len)
{
    /* The value parsed once already (effects_parse); it is not NUL-terminated. */
    struct json_tokener *tok = json_tokener_new();
    json_object *data = tok ? json_tokener_parse_ex(tok, r->ev.value, (int)r->ev.value_len) : NULL;
    if (tok) json_tokener_free(tok);
    if (!data) return NULL;
    json_object *ce = json_object_new_object();
    json_object_object_add(ce, "specversion", json_object_new_string("1.0"));
    json_object_object_add(ce, "id", json_object_new_string(r->ev.event_id));
    json_object_object_add(ce, "source", json_object_new_string(CE_SOURCE_TICKETD));
    json_object_object_add(ce, "type", json_object_new_string(CE_TYPE_TICKET_APPLIED));
    if (r->ev.ce_time[0]) json_object_object_add(ce, "time", json_object_new_string(r->ev.ce_time));
    json_object_object_add(ce, "datacontenttype", json_object_new_string("application/json"));
    json_object_object_add(ce, "data", data);
    size_t n;
    const char *s = json_object_to_json_string_length(ce, JSON_C_TO_STRING_PLAIN, &n);
    char *copy = malloc(n + 1);
    if (copy) {
        memcpy(copy, s, n + 1);
        *len = n;
    }
    json_object_put(ce);
    return copy;
}

static void start_data_platform(struct run *r)
{
    const struct cfg *cfg = r->fx->cfg;
    size_t len = 0;
    char *body = cloudevent_json(r, &len);
    char idem[64 + UUID_STR_LEN];
    snprintf(idem, sizeof idem, "Idempotency-Key: %s", r->ev.event_id);
    const char *headers[] = {idem};
    int rc = body ? hc_post_json(r->fx->hc, cfg->data_platform_url, headers, 1,
                                 "application/cloudevents+json; charset=UTF-8", body, len,
                                 cfg->http_timeout_ms, on_http_done, r)
                  : -ENOMEM;
    free(body);
    if (rc != 0) {
        char msg[96];
        snprintf(msg, sizeof msg, "could not start the request: %s", strerror(-rc));
        mark(r, false, rc == -ECANCELED ? "closing" : "sink_transport", msg);
    }
}

static char *email_message(const struct run *r, const struct cfg *cfg, size_t *len)
{
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
    char *msg = NULL;
    int n = asprintf(&msg,
                     "Date: %s\r\n"
                     "From: <%s>\r\n"
                     "To: <%s>\r\n"
                     "Message-ID: <%s@ticketd>\r\n"
                     "Subject: Your ticket application for %s was received\r\n"
                     "MIME-Version: 1.0\r\n"
                     "Content-Type: text/plain; charset=UTF-8\r\n"
                     "Content-Transfer-Encoding: 8bit\r\n"
                     "\r\n"
                     "Your application number %" PRId64 " for %s has been received.\r\n"
                     "Reference: %s\r\n",
                     date, cfg->mail_from, r->ev.email, r->ev.event_id, r->ev.ticket_event,
                     r->ev.application_id, r->ev.ticket_event, r->ev.event_id);
    if (n < 0) return NULL;
    *len = (size_t)n;
    return msg;
}

static void start_email(struct run *r)
{
    const struct cfg *cfg = r->fx->cfg;
    size_t len = 0;
    char *msg = email_message(r, cfg, &len);
    int rc = msg ? hc_smtp_send(r->fx->hc, cfg->smtp_url, cfg->mail_from, r->ev.email, msg, len,
                                cfg->http_timeout_ms, on_smtp_done, r)
                 : -ENOMEM;
    free(msg);
    if (rc != 0) {
        char m[96];
        snprintf(m, sizeof m, "could not start the request: %s", strerror(-rc));
        mark(r, false, rc == -ECANCELED ? "closing" : "smtp", m);
    }
}

static void run_next(struct run *r)
{
    if (r->fx->stopped && ((r->want_dp && !r->dp_done) || (r->want_email && !r->email_done))) {
        run_finish(r, "closing", "shutting down");
        return;
    }
    if (r->want_dp && !r->dp_done) {
        r->stage = ST_DATA_PLATFORM;
        start_data_platform(r);
        return;
    }
    if (r->want_email && !r->email_done) {
        r->stage = ST_EMAIL;
        start_email(r);
        return;
    }
    run_finish(r, NULL, NULL);
}

static void on_points(void *ud, const PGresult *res, const char *error)
{
    char qb[600];
    struct run *r = ud;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        snprintf(r->fail_msg, sizeof r->fail_msg, "points: %s",
                 error ? error : res ? PQresultErrorMessage(res) : "no result");
        /* strip the trailing newline libpq adds */
        size_t n = strlen(r->fail_msg);
        while (n && (r->fail_msg[n - 1] == '\n' || r->fail_msg[n - 1] == ' ')) r->fail_msg[--n] = 0;
        ascii_only(r->fail_msg);
        metrics_counter_add("ticketd_sink_failures_total", "effect=\"points\"", 1);
        log_warn("effects", "event=effect_failed event_id=%s effect=points class=db err=%s",
                 r->ev.event_id, lq(r->fail_msg, qb, sizeof qb));
        run_finish(r, "db", r->fail_msg);
        return;
    }
    r->points_granted = strcmp(PQgetvalue(res, 0, 0), "1") == 0;
    r->dp_done = PQgetvalue(res, 0, 1)[0] == 't';
    r->email_done = PQgetvalue(res, 0, 2)[0] == 't';
    if (r->points_granted) metrics_counter_add("ticketd_points_granted_total", NULL, 1);
    run_next(r);
}

int effects_run(struct effects *fx, const struct effects_event *ev, effects_done_fn cb, void *ud)
{
    const struct cfg *cfg = fx->cfg;
    struct run *r = calloc(1, sizeof *r);
    if (!r) return -ENOMEM;
    r->fx = fx;
    r->ev = *ev;
    r->cb = cb;
    r->ud = ud;
    r->want_dp = cfg->data_platform_url && cfg->data_platform_url[0];
    r->want_email = ev->email[0] && cfg->smtp_url && cfg->smtp_url[0];
    r->stage = ST_POINTS;

    char wanted[64];
    snprintf(wanted, sizeof wanted, "{points%s%s}", r->want_dp ? ",data_platform" : "",
             r->want_email ? ",email" : "");
    char part[16], off[24], app[24], points[16];
    snprintf(part, sizeof part, "%" PRId32, ev->partition);
    snprintf(off, sizeof off, "%" PRId64, ev->offset);
    snprintf(app, sizeof app, "%" PRId64, ev->application_id);
    snprintf(points, sizeof points, "%d", cfg->points_per_application);
    const char *params[9] = {ev->event_id, fx->group, ev->topic, part, off, app, ev->phone,
                             points, wanted};
    int rc = dbp_query(fx->db, points_sql, 9, params, on_points, r);
    if (rc != 0) {
        free(r);
        return rc;
    }
    fx->inflight++;
    return 0;
}
