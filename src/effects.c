/* effects: an event's effects end to end behind one call (effects.h): the runs, their
 * per-partition lanes (external calls in offset order), the e-mail claims, the external
 * calls (data platform over HTTP, e-mail over SMTP) and the outcomes. The group commit of
 * the statements is in effects_batch.c. */
#include "effects.h"

#include <errno.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "db_pool.h"
#include "effects_batch.h"
#include "http_client.h"
#include "kafka_common.h"
#include "log.h"
#include "metrics.h"

/* The runs of one partition, in the order effects_run was called (offset order). */
struct fx_lane {
    struct effects *fx;
    int32_t partition;
    struct effects_run *head, *tail;
    struct effects_run *chain;     /* the first run whose external calls are not all done */
    bool pump_due;                 /* a resumed run may start a call: pumped by the check */
};

/* $1 event id, $2 token, $3 ttl in ms. The outer SELECT reads the row as it was before the
 * UPDATE: claimed = 1 -> ours; else done -> nothing to send; else held by another token. */
static const char claim_sql[] =
    "WITH c AS (UPDATE event_effects SET claim_token = $2::uuid,"
    " claimed_until = now() + $3::bigint * interval '1 millisecond', updated_at = now()"
    " WHERE event_id = $1::uuid AND effect = 'email' AND NOT done"
    " AND (claim_token IS NULL OR claim_token = $2::uuid OR claimed_until < now())"
    " RETURNING 1)"
    " SELECT (SELECT count(*) FROM c)::int, e.done FROM event_effects e"
    " WHERE e.event_id = $1::uuid AND e.effect = 'email'";

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

/* ---- life ---- */

static void on_check(uv_check_t *h);

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
    fxb_prepare(fx);
    fx->claim_stmt = dbp_prepare(db, claim_sql);
    if (fx->claim_stmt < 0) fx->claim_stmt = -1;
    metrics_describe("ticketd_sink_failures_total", "counter",
                     "failed follow-up effect attempts, by effect");
    metrics_describe("ticketd_points_granted_total", "counter",
                     "points_ledger rows inserted (exactly one per event)");
    metrics_describe("ticketd_consumer_points_batch_size", "histogram",
                     "events per points statement (group commit of the consumer)");
    metrics_describe("ticketd_consumer_marks_batch_size", "histogram",
                     "done marks per statement");
    uv_check_init(loop, &fx->check);
    uv_idle_init(loop, &fx->idle);
    fx->check.data = fx->idle.data = fx;
    fx->open_handles = 2;
    uv_check_start(&fx->check, on_check);
    uv_unref((uv_handle_t *)&fx->check); /* work in flight keeps the loop alive, not this */
    *out = fx;
    return 0;
}

void effects_drain(struct effects *fx)
{
    fx->draining = true;
}

void effects_stop(struct effects *fx)
{
    fx->draining = fx->stopped = true;
}

unsigned effects_inflight(const struct effects *fx)
{
    return fx->inflight + (unsigned)fx->queue[Q_MARKS].n;
}

static bool wants_data_platform(const struct effects *fx)
{
    return fx->cfg->data_platform_url && fx->cfg->data_platform_url[0];
}

static bool wants_email(const struct effects *fx, const struct effects_event *ev)
{
    return ev->email[0] && fx->cfg->smtp_url && fx->cfg->smtp_url[0];
}

/* The database state as the effects' statements see it, logged on changes only. */
void fx_db_health(struct effects *fx, bool healthy, const char *error)
{
    char qb[600];
    if (healthy == !fx->db_unhealthy) return;
    fx->db_unhealthy = !healthy;
    if (healthy) {
        log_info("consumer", "event=database_recovered");
        return;
    }
    log_warn("consumer", "event=database_unhealthy action=wait_without_using_attempts err=%s",
             log_quoted(error, qb, sizeof qb));
}

static void on_idle(uv_idle_t *h)
{
    (void)h; /* only keeps the loop from blocking in poll; the check handle does the work */
}

/* Wakes the loop's check handle soon (a batch may be cut, a lane pumped). */
void fx_kick(struct effects *fx)
{
    if (!fx->stopped && !uv_is_active((uv_handle_t *)&fx->idle)) uv_idle_start(&fx->idle, on_idle);
}

/* ---- runs and lanes ---- */

static void run_free(struct effects_run *r)
{
    free(r->last_error);
    free(r);
}

static void list_unlink(struct effects_run **head, struct effects_run **tail,
                        struct effects_run *r)
{
    if (r->prev) r->prev->next = r->next;
    else *head = r->next;
    if (r->next) r->next->prev = r->prev;
    else if (tail) *tail = r->prev;
    r->prev = r->next = NULL;
}

/* r stops being the caller's: no callback any more; what is in flight finishes; done marks
 * of calls that happened are still written (a dropped one would make the next owner mail
 * again once the claim expired), failure marks only when keep_failures. */
static void orphan(struct effects_run *r, bool keep_failures)
{
    struct effects *fx = r->fx;
    struct fx_lane *l = r->lane;
    if (r->orphan) return;
    if (l) {
        if (l->chain == r) l->chain = r->next;
        list_unlink(&l->head, &l->tail, r);
        l->pump_due = true; /* the next run's call may start now */
        fx_kick(fx);
    }
    r->lane = NULL;
    r->orphan = true;
    r->waiting = false;
    fxb_ready_remove(r);
    if (r->ext[0].pending_done || r->ext[1].pending_done) fxb_marks_push(r);
    else if (!keep_failures) fxb_marks_remove(r);
    r->prev = NULL;
    r->next = fx->orphans;
    if (fx->orphans) fx->orphans->prev = r;
    fx->orphans = r;
}

/* Orphans whose callbacks all arrived and whose marks were written are freed here (from
 * the check handle, so that no batch is walking them). */
static void reap_orphans(struct effects *fx)
{
    for (struct effects_run *r = fx->orphans, *nx; r; r = nx) {
        nx = r->next;
        if (r->ops == 0 && !r->link[Q_MARKS].in) {
            list_unlink(&fx->orphans, NULL, r);
            run_free(r);
        }
    }
}

static struct fx_lane *lane_get(struct effects *fx, int32_t partition)
{
    if (partition < 0) return NULL;
    if (partition >= fx->nlanes) {
        int32_t n = partition + 1;
        struct fx_lane **nl = realloc(fx->lanes, sizeof *nl * (size_t)n);
        if (!nl) return NULL;
        for (int32_t i = fx->nlanes; i < n; i++) nl[i] = NULL;
        fx->lanes = nl;
        fx->nlanes = n;
    }
    if (!fx->lanes[partition]) {
        struct fx_lane *l = calloc(1, sizeof *l);
        if (!l) return NULL;
        l->fx = fx;
        l->partition = partition;
        fx->lanes[partition] = l;
    }
    return fx->lanes[partition];
}

void effects_detach(struct effects *fx, int32_t partition)
{
    if (!fx) return; /* closed: every run is gone */
    if (partition < 0 || partition >= fx->nlanes || !fx->lanes[partition]) return;
    struct fx_lane *l = fx->lanes[partition];
    fx->lanes[partition] = NULL;
    unsigned n = 0;
    while (l->head) {
        orphan(l->head, false);
        n++;
    }
    if (n) log_debug("effects", "event=detached partition=%" PRId32 " runs=%u", partition, n);
    free(l);
}

void effects_release(struct effects *fx, struct effects_run *r)
{
    if (fx && r) orphan(r, true); /* (closed: every run is gone) */
}

/* ---- outcomes ---- */

static void report(struct effects_run *r, enum effects_status status, const char *error_class,
                   const char *msg, bool db_fault)
{
    if (r->orphan || !r->waiting) return;
    r->waiting = false;
    struct effects_outcome o = {.status = status, .error_class = error_class,
                                .error_message = msg ? msg : "", .db_fault = db_fault};
    if (status == EFFECTS_DONE) orphan(r, false); /* the caller's handle ends here */
    r->cb(r->ud, &o);
}

void fx_run_fail(struct effects_run *r, unsigned hold, const char *error_class, const char *msg,
                 bool db_fault)
{
    struct effects *fx = r->fx;
    if (r->orphan) return;
    if (strcmp(error_class, "db") == 0 && dbp_connected(fx->db) == 0) db_fault = true;
    if (strcmp(error_class, "db_unavailable") == 0) db_fault = true;
    if (db_fault) fx_db_health(fx, false, msg);
    r->hold |= hold;
    if (!r->last_error) r->last_error = malloc(DLQ_MESSAGE_MAX);
    if (r->last_error) {
        snprintf(r->last_error, DLQ_MESSAGE_MAX, "%s", msg ? msg : "");
        fxb_ascii_only(r->last_error);
    }
    /* a second failure of the same round (steps run side by side) only holds its step */
    report(r, EFFECTS_FAILED, error_class, r->last_error, db_fault);
}

void fx_run_check(struct effects_run *r)
{
    if (r->orphan || !r->waiting || !r->points_ok || r->hold) return;
    for (int k = 0; k < 2; k++)
        if (r->ext[k].want && !r->ext[k].committed) return;
    report(r, EFFECTS_DONE, NULL, NULL, false);
}

/* ---- the e-mail claim ---- */

static void lane_pump(struct fx_lane *l);

static uint64_t claim_ttl_ms(const struct effects *fx)
{
    return (uint64_t)fx->cfg->http_timeout_ms * 2 + 10000;
}

/* A random UUID (version 4) naming this copy of the event in its e-mail claims. */
static void make_token(struct effects_run *r)
{
    uint8_t b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        uint64_t x = uv_hrtime(), y = uv_hrtime() ^ (uint64_t)(uintptr_t)r;
        memcpy(b, &x, 8);
        memcpy(b + 8, &y, 8);
    }
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(r->token, sizeof r->token,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
             b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
             b[15]);
}

static void on_claim(void *ud, const PGresult *res, const char *error)
{
    char msg[600];
    struct effects_run *r = ud;
    struct effects *fx = r->fx;
    fx->inflight--;
    r->ops--;
    r->claiming = false;
    if (r->orphan) return;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        fxb_db_error(msg, sizeof msg, "email claim: ", res, error);
        bool ours = dbp_error_is_ours(res);
        fx_run_fail(r, HOLD_CALL, ours ? "db_unavailable" : "db", msg, ours);
        return;
    }
    fx_db_health(fx, true, NULL);
    if (PQntuples(res) > 0 && strcmp(PQgetvalue(res, 0, 0), "1") != 0) {
        if (PQgetvalue(res, 0, 1)[0] == 't') {
            /* another copy sent it and its done mark committed */
            log_debug("effects", "event=email_already_sent partition=%" PRId32
                      " offset=%" PRId64 " event_id=%s", r->ev.partition, r->ev.offset,
                      r->ev.event_id);
            r->ext[EFFECTS_EMAIL].called = r->ext[EFFECTS_EMAIL].committed = true;
            fx_run_check(r);
            if (r->lane) lane_pump(r->lane);
            return;
        }
        /* another copy is sending it: wait for its done mark (not an attempt) */
        log_debug("effects", "event=email_claimed_elsewhere partition=%" PRId32
                  " offset=%" PRId64 " event_id=%s action=wait", r->ev.partition, r->ev.offset,
                  r->ev.event_id);
        r->hold |= HOLD_CALL;
        report(r, EFFECTS_RETRY, NULL, NULL, false);
        return;
    }
    /* ours (no row to claim cannot happen). A claim that took long to come back (the process
     * was paused) is not trusted to last through the call: claim again */
    r->email_claimed = uv_now(fx->loop) - r->claim_sent_at < claim_ttl_ms(fx) / 2;
    if (r->lane) lane_pump(r->lane);
}

static void claim_email(struct effects_run *r)
{
    struct effects *fx = r->fx;
    if (!r->token[0]) make_token(r);
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%" PRIu64, claim_ttl_ms(fx));
    const char *params[3] = {r->ev.event_id, r->token, ttl};
    int rc = fx->claim_stmt >= 0
                 ? dbp_query_prepared(fx->db, fx->claim_stmt, 3, params, on_claim, r)
                 : dbp_query(fx->db, claim_sql, 3, params, on_claim, r);
    if (rc != 0) {
        fx_run_fail(r, HOLD_CALL, "db_unavailable", "email claim: database unavailable", true);
        return;
    }
    fx->inflight++;
    r->ops++;
    r->claiming = true;
    r->claim_sent_at = uv_now(fx->loop);
}

/* ---- external calls ---- */

static void on_call_done(struct effects_run *r, bool ok, const char *error_class,
                         const char *error_message);

/* Outcome of one external call. error_class: NULL on success, else "sink_status",
 * "sink_transport", "smtp" or "closing" (the short class for the DLQ header); the message is
 * printable ASCII. Failures are counted (ticketd_sink_failures_total) and logged here. */
static void call_finish(struct effects_run *k, const char *error_class, const char *message)
{
    char qb[600];
    char msg[512] = "";
    if (error_class) {
        const char *effect = fxb_kind_name(k->calling_kind);
        snprintf(msg, sizeof msg, "%s: %s", effect, message);
        fxb_ascii_only(msg);
        char labels[64];
        snprintf(labels, sizeof labels, "effect=\"%s\"", effect);
        if (strcmp(error_class, "closing") != 0) /* shutdown aborts are not sink failures */
            metrics_counter_add("ticketd_sink_failures_total", labels, 1);
        log_warn("effects", "event=effect_failed event_id=%s effect=%s class=%s err=%s",
                 k->ev.event_id, effect, error_class, log_quoted(message, qb, sizeof qb));
    }
    k->fx->inflight--;
    on_call_done(k, error_class == NULL, error_class, msg);
}

static void on_http_done(void *ud, const struct hc_result *res)
{
    struct effects_run *k = ud;
    char msg[384];

    if (res->curl_code != 0) {
        snprintf(msg, sizeof msg, "%s", res->error);
        call_finish(k, strcmp(res->error, "closing") == 0 ? "closing" : "sink_transport", msg);
        return;
    }
    if (res->status < 200 || res->status > 299) {
        char body[128];
        log_quote(res->body, body, sizeof body);
        snprintf(msg, sizeof msg, "HTTP %ld %s", res->status, body);
        call_finish(k, "sink_status", msg);
        return;
    }
    call_finish(k, NULL, NULL);
}

static void on_smtp_done(void *ud, const struct hc_result *res)
{
    struct effects_run *k = ud;
    char msg[384];

    if (res->curl_code != 0) {
        snprintf(msg, sizeof msg, "%s (reply %ld)", res->error, res->status);
        call_finish(k, strcmp(res->error, "closing") == 0 ? "closing" : "smtp", msg);
        return;
    }
    call_finish(k, NULL, NULL);
}

/* The CloudEvent in structured mode: the attributes plus the application as data. */
static char *cloudevent_json(const struct effects_event *ev, size_t *len)
{
    /* The value parsed once already (effects_parse); it is not NUL-terminated. */
    struct json_tokener *tok = json_tokener_new();
    json_object *data = tok ? json_tokener_parse_ex(tok, ev->value, (int)ev->value_len) : NULL;
    if (tok) json_tokener_free(tok);
    if (!data) return NULL;
    json_object *ce = json_object_new_object();
    json_object_object_add(ce, "specversion", json_object_new_string("1.0"));
    json_object_object_add(ce, "id", json_object_new_string(ev->event_id));
    json_object_object_add(ce, "source", json_object_new_string(CE_SOURCE_TICKETD));
    json_object_object_add(ce, "type", json_object_new_string(CE_TYPE_TICKET_APPLIED));
    if (ev->ce_time[0]) json_object_object_add(ce, "time", json_object_new_string(ev->ce_time));
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

static char *email_message(const struct effects_event *ev, const struct cfg *cfg, size_t *len)
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
                     date, cfg->mail_from, ev->email, ev->event_id, ev->ticket_event,
                     ev->application_id, ev->ticket_event, ev->event_id);
    if (n < 0) return NULL;
    *len = (size_t)n;
    return msg;
}

/* The data-platform POST or the e-mail of r; on_call_done runs exactly once on a later loop
 * turn. Returns 0, or -errno (-ECANCELED after effects_stop; no callback). */
static int start_call(struct effects_run *k, enum effects_kind kind)
{
    struct effects *fx = k->fx;
    const struct cfg *cfg = fx->cfg;
    const struct effects_event *ev = &k->ev;
    if (fx->stopped) return -ECANCELED;
    k->calling_kind = kind;
    size_t len = 0;
    int rc;
    if (kind == EFFECTS_DATA_PLATFORM) {
        char *body = cloudevent_json(ev, &len);
        char idem[64 + UUID_STR_LEN];
        snprintf(idem, sizeof idem, "Idempotency-Key: %s", ev->event_id);
        const char *headers[] = {idem};
        rc = body ? hc_post_json(fx->hc, cfg->data_platform_url, headers, 1,
                                 "application/cloudevents+json; charset=UTF-8", body, len,
                                 cfg->http_timeout_ms, on_http_done, k)
                  : -ENOMEM;
        free(body);
    } else {
        char *msg = email_message(ev, cfg, &len);
        rc = msg ? hc_smtp_send(fx->hc, cfg->smtp_url, !cfg->smtp_allow_cleartext,
                                cfg->mail_from, ev->email, msg, len, cfg->http_timeout_ms,
                                on_smtp_done, k)
                 : -ENOMEM;
        free(msg);
    }
    if (rc != 0) return rc;
    fx->inflight++;
    return 0;
}

/* ---- lanes: the external calls of a partition, in offset order, one at a time ---- */

static bool calls_done(const struct effects_run *r)
{
    return (!r->ext[0].want || r->ext[0].called) && (!r->ext[1].want || r->ext[1].called);
}

/* A mark for effect k of r: one more call, done or failed. */
static void add_mark(struct effects_run *r, enum effects_kind k, bool done)
{
    r->ext[k].pending_tries++;
    if (done) r->ext[k].pending_done = true;
    if (!r->ext[k].sent) fxb_marks_push(r);
}

/* Starts the next external call of the lane: the calls of one run in the fixed order data
 * platform, e-mail; the next run only after both succeeded (so the sink receives a
 * partition's events in offset order, retries included). */
static void lane_pump(struct fx_lane *l)
{
    struct effects *fx = l->fx;
    while (l->chain) {
        struct effects_run *r = l->chain;
        if (r->points_ok && calls_done(r)) {
            l->chain = r->next;
            continue;
        }
        if (!r->points_ok || r->calling || r->claiming || (r->hold & HOLD_CALL) || fx->draining)
            return;
        enum effects_kind k = r->ext[EFFECTS_DATA_PLATFORM].want &&
                                      !r->ext[EFFECTS_DATA_PLATFORM].called
                                  ? EFFECTS_DATA_PLATFORM
                                  : EFFECTS_EMAIL;
        if (k == EFFECTS_EMAIL && !r->email_claimed) {
            claim_email(r);
            return;
        }
        r->email_claimed = false; /* one claim, one attempt */
        int rc = start_call(r, k);
        if (rc != 0) {
            char msg[128];
            snprintf(msg, sizeof msg, "%s: could not start the request: %s", fxb_kind_name(k),
                     strerror(-rc));
            r->ext[k].pending_tries++; /* recorded like any failed call */
            if (!r->ext[k].sent) fxb_marks_push(r);
            fx_run_fail(r, HOLD_CALL,
                        rc == -ECANCELED ? "closing"
                        : k == EFFECTS_DATA_PLATFORM ? "sink_transport" : "smtp", msg, false);
            return;
        }
        r->calling = true;
        r->ops++;
        return;
    }
}

void fx_lane_pump_of(struct effects_run *r)
{
    if (r->lane) lane_pump(r->lane);
}

static void on_call_done(struct effects_run *r, bool ok, const char *error_class,
                         const char *error_message)
{
    enum effects_kind k = r->calling_kind;
    r->calling = false;
    r->ops--;
    if (r->orphan) {
        /* released or detached meanwhile: a call that happened still gets its done mark */
        if (ok) add_mark(r, k, true);
        return;
    }
    if (ok) {
        r->ext[k].called = true;
        add_mark(r, k, true);
        if (r->lane) lane_pump(r->lane);
        return;
    }
    add_mark(r, k, false);
    fx_run_fail(r, HOLD_CALL, error_class, error_message, false);
}

/* After each poll phase: reap orphans, pump the lanes of resumed runs, cut the batches. */
static void on_check(uv_check_t *h)
{
    struct effects *fx = h->data;
    if (fx->orphans) reap_orphans(fx);
    if (fx->stopped) {
        uv_idle_stop(&fx->idle);
        return;
    }
    for (int32_t i = 0; i < fx->nlanes; i++) {
        struct fx_lane *l = fx->lanes[i];
        if (l && l->pump_due) {
            l->pump_due = false;
            lane_pump(l);
        }
    }
    /* stay awake only while something can be sent now; results wake the loop otherwise */
    if (fxb_cut(fx)) uv_idle_start(&fx->idle, on_idle);
    else uv_idle_stop(&fx->idle);
}

/* ---- the one call ---- */

/* Queues the steps of r that are not done: nothing runs from inside the caller's call. */
static void run_queue(struct effects_run *r)
{
    r->waiting = true;
    unsigned hold = r->hold;
    r->hold = 0;
    if (!r->points_ok && !r->in_points) fxb_ready_push(r);
    if (hold & HOLD_MARKS)
        for (int k = 0; k < 2; k++)
            if (r->ext[k].pending_tries > 0 && !r->ext[k].sent) fxb_marks_push(r);
    r->lane->pump_due = true;
    fx_kick(r->fx);
}

int effects_run(struct effects *fx, const struct effects_event *ev, effects_outcome_fn cb,
                void *ud, struct effects_run **out)
{
    if (fx->draining) return -ECANCELED;
    struct fx_lane *l = lane_get(fx, ev->partition);
    struct effects_run *r = l ? calloc(1, sizeof *r) : NULL;
    if (!r) return -ENOMEM;
    r->fx = fx;
    r->lane = l;
    r->ev = *ev;
    r->cb = cb;
    r->ud = ud;
    r->ext[EFFECTS_DATA_PLATFORM].want = wants_data_platform(fx);
    r->ext[EFFECTS_EMAIL].want = wants_email(fx, ev);
    r->prev = l->tail;
    if (l->tail) l->tail->next = r;
    else l->head = r;
    l->tail = r;
    if (!l->chain) l->chain = r;
    run_queue(r);
    *out = r;
    return 0;
}

int effects_resume(struct effects *fx, struct effects_run *r)
{
    if (fx->draining) return -ECANCELED;
    if (r->orphan || r->waiting) return -EINVAL;
    run_queue(r);
    return 0;
}

/* ---- close ---- */

static void free_runs(struct effects_run *r)
{
    while (r) {
        struct effects_run *nx = r->next;
        run_free(r);
        r = nx;
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    struct effects *fx = h->data;
    if (--fx->open_handles > 0) return;
    for (int32_t i = 0; i < fx->nlanes; i++) {
        if (!fx->lanes[i]) continue;
        free_runs(fx->lanes[i]->head);
        free(fx->lanes[i]);
    }
    free(fx->lanes);
    free_runs(fx->orphans);
    void (*done)(void *) = fx->close_done;
    void *ud = fx->close_ud;
    free(fx->group);
    free(fx);
    if (done) done(ud);
}

void effects_close(struct effects *fx, void (*done)(void *ud), void *ud)
{
    effects_stop(fx);
    fx->close_done = done;
    fx->close_ud = ud;
    uv_check_stop(&fx->check);
    uv_idle_stop(&fx->idle);
    uv_close((uv_handle_t *)&fx->check, on_handle_closed);
    uv_close((uv_handle_t *)&fx->idle, on_handle_closed);
}
