/* admin_http: every /admin/... route, behind the bearer token checked once here.
 *
 * The records (/admin/applications...) are one async query on the API pool. The reports
 * (audit, trace, dlq list/replay, report) are blocking functions (sync libpq, rdkafka); each
 * runs as a job on libuv's thread pool, never on the loop, and the job says what its body
 * is (JSON, or the report's HTML). */
#include "admin_http.h"

#include <inttypes.h>
#include <llhttp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api.h"
#include "app_status.h"
#include "audit.h"
#include "db_pool.h"
#include "dlq.h"
#include "effects.h"
#include "limits.h"
#include "log.h"
#include "report.h"
#include "trace.h"
#include "validate.h"

#define HTML_TYPE "text/html; charset=utf-8"

/* ---- authorization ---- */

/* Compares in time that depends only on the lengths, never on where the bytes differ. */
static bool constant_time_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char diff = (unsigned char)(alen != blen);
    size_t n = alen > blen ? alen : blen;
    for (size_t i = 0; i < n; i++) {
        unsigned char x = i < alen ? (unsigned char)a[i] : 0;
        unsigned char y = i < blen ? (unsigned char)b[i] : 0;
        diff |= x ^ y;
    }
    return diff == 0;
}

/* true for "Authorization: Bearer <ADMIN_TOKEN>"; otherwise answers 401, or 403 when no
 * token is configured (admin disabled), and returns false. */
static bool authorized(struct app *app, struct http_request *req)
{
    const char *token = app->cfg->admin_token;
    if (!token || !*token) {
        api_respond_error(req, 403, "admin_disabled",
                          "admin endpoints are disabled: ADMIN_TOKEN is not set", NULL);
        return false;
    }
    const char *auth = req->authorization;
    if (auth && strncasecmp(auth, "Bearer ", 7) == 0) {
        const char *given = auth + 7;
        while (*given == ' ') given++;
        size_t glen = strlen(given);
        while (glen > 0 && given[glen - 1] == ' ') glen--;
        if (constant_time_equal(given, glen, token, strlen(token))) return true;
    }
    api_respond_error(req, 401, "unauthorized", "a valid admin bearer token is required",
                      "WWW-Authenticate: Bearer realm=\"ticketd\"\r\n");
    return false;
}

/* ---- the job frame: a report run on the thread pool ---- */

/* The first member of every report's job struct (calloc'ed by job_alloc). */
struct admin_job {
    uv_work_t work;
    struct http_request *req;
    const struct cfg *cfg;
    char *brokers;               /* a copy of app->kafka_brokers */
    /* On the thread pool: runs the report and sets body (malloc'd) and content_type (NULL
     * for JSON); returns the HTTP status. */
    int (*run)(struct admin_job *job);
    int status;
    char *body;
    const char *content_type;
};

/* A zeroed job of `size` bytes; NULL after answering 503 when memory is short. */
static void *job_alloc(struct http_request *req, size_t size)
{
    void *job = calloc(1, size);
    if (!job) api_respond_error(req, 503, "unavailable", "out of memory", API_RETRY_AFTER_1);
    return job;
}

static void job_free(struct admin_job *job)
{
    free(job->body);
    free(job->brokers);
    free(job);
}

static void job_work(uv_work_t *w)
{
    struct admin_job *job = w->data;
    job->status = job->run(job);
}

static void job_after(uv_work_t *w, int status)
{
    struct admin_job *job = w->data;
    struct http_request *req = job->req;
    if (status == UV_ECANCELED) {
        api_respond_error(req, 503, "unavailable", "shutting down", API_RETRY_AFTER_1);
    } else if (job->status < 100 || job->status > 599 || !job->body) {
        log_error("admin", "event=job_failed req=%" PRIu64 " status=%d", req->id, job->status);
        api_respond_error(req, 500, "internal", NULL, NULL);
    } else {
        /* A 503 of a report is the database or Kafka being unreachable: say when to retry. */
        api_respond(req, job->status, job->content_type ? job->content_type : API_JSON_TYPE,
                    job->body, strlen(job->body), job->status == 503 ? API_RETRY_AFTER_1 : NULL);
    }
    job_free(job);
}

/* Runs job->run on the thread pool with app's settings and brokers and answers with what it
 * set. Takes job in every case: when no Kafka brokers are known yet or memory is short it
 * answers 503 and frees it. */
static void job_start(struct app *app, struct http_request *req, struct admin_job *job,
                      int (*run)(struct admin_job *job))
{
    if (!app->kafka_brokers || !*app->kafka_brokers) {
        api_respond_error(req, 503, "unavailable", "no Kafka brokers known yet", API_RETRY_AFTER_1);
        free(job);
        return;
    }
    job->work.data = job;
    job->req = req;
    job->cfg = app->cfg;
    job->run = run;
    job->brokers = strdup(app->kafka_brokers);
    if (!job->brokers) {
        api_respond_error(req, 503, "unavailable", "out of memory", API_RETRY_AFTER_1);
        job_free(job);
        return;
    }
    int rc = uv_queue_work(app->loop, &job->work, job_work, job_after);
    if (rc < 0) {
        log_error("admin", "event=queue_work_failed err=%s", uv_strerror(rc));
        job_free(job);
        api_respond_error(req, 503, "unavailable", NULL, API_RETRY_AFTER_1);
    }
}

static char *error_body(const char *code, const char *message)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "error", json_object_new_string(code));
    json_object_object_add(o, "message", json_object_new_string(message));
    char *s = strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
    json_object_put(o);
    return s;
}

/* The answer of a report that returned r: 200 with report (taken) when r >= 0; 400
 * {"error": "bad_request", "message": err} when r == -2; else 503 with failed_code. */
static int job_reply(struct admin_job *job, int r, json_object *report, const char *failed_code,
                     const char *err)
{
    if (r < 0) {
        job->body = error_body(r == -2 ? "bad_request" : failed_code, err);
        return r == -2 ? 400 : 503;
    }
    job->body = strdup(json_object_to_json_string_ext(report, JSON_C_TO_STRING_PLAIN |
                                                                  JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(report);
    return 200;
}

/* A report's failure in the log, its text quoted: a database's message can echo the request's
 * own quotes (a bad since=), which raw would forge logfmt keys. */
static void job_log_failure(const char *module, const char *event, const char *err)
{
    char qb[600];
    log_warn(module, "event=%s error=%s", event, log_quoted(err, qb, sizeof qb));
}

static void bad_request(struct http_request *req, const char *message)
{
    api_respond_error(req, 400, "bad_request", message, NULL);
}

/* ---- GET /admin/applications/{id} and /admin/applications?event_id=&phone= ---- */

/* The full record, built by PostgreSQL: the row, its newest outbox row, its processed_events
 * row, effects and newest dead letter, and the status of app_status.h. Expects the aliases
 * of APP_STATUS_FROM_SQL. */
#define RECORD_JSON_SQL                                                                        \
    "json_build_object("                                                                       \
    "'id', a.id, 'reference', a.reference, 'event_id', a.event_id, "                          \
    "'phone', CASE length(a.phone) "                                                           \
    "  WHEN 11 THEN substr(a.phone,1,3)||'-'||substr(a.phone,4,4)||'-'||substr(a.phone,8,4) "  \
    "  WHEN 10 THEN substr(a.phone,1,3)||'-'||substr(a.phone,4,3)||'-'||substr(a.phone,7,4) "  \
    "  ELSE a.phone END, "                                                                     \
    "'name', a.name, 'email', a.email, 'seats', a.seats, "                                     \
    "'created_at', " DBP_RFC3339_UTC("a.created_at") ", " \
    "'status', " APP_STATUS_SQL ", "                                                           \
    "'outbox', CASE WHEN o.id IS NULL THEN NULL ELSE json_build_object("                       \
    "  'event_id', o.event_id, "                                                               \
    "  'created_at', " DBP_RFC3339_UTC("o.created_at") ", " \
    "  'published_at', " DBP_RFC3339_UTC("o.published_at") ", " \
    "  'partition', o.kafka_partition, 'offset', o.kafka_offset, "                             \
    "  'attempts', o.attempts, 'last_error', o.last_error) END, "                              \
    "'processed', CASE WHEN p.event_id IS NULL THEN NULL ELSE json_build_object("              \
    "  'consumer_group', p.consumer_group, 'topic', p.topic, 'partition', p.partition, "       \
    "  'offset', p.\"offset\", "                                                               \
    "  'processed_at', " DBP_RFC3339_UTC("p.processed_at") ") END, " \
    "'effects', COALESCE((SELECT json_agg(json_build_object('effect', e.effect, 'done', e.done, " \
    "  'attempts', e.attempts, 'last_error', e.last_error) ORDER BY e.effect) "                \
    "  FROM event_effects e WHERE e.event_id = o.event_id), '[]'::json), "                     \
    "'dead_letter', (SELECT json_build_object('id', d.id, 'src_topic', d.src_topic, "          \
    "  'src_partition', d.src_partition, 'src_offset', d.src_offset, "                         \
    "  'dlq_partition', d.dlq_partition, 'dlq_offset', d.dlq_offset, 'attempts', d.attempts, " \
    "  'error_class', d.error_class, 'error_message', d.error_message, "                       \
    "  'dead_lettered_at', " DBP_RFC3339_UTC("d.dead_lettered_at") ", " \
    "  'replayed_at', " DBP_RFC3339_UTC("d.replayed_at") ") " \
    "  FROM dead_letters d WHERE d.event_id = o.event_id ORDER BY d.id DESC LIMIT 1))"

static const char get_application_sql[] =
    "SELECT " RECORD_JSON_SQL "::text" APP_STATUS_FROM_SQL " WHERE a.id = $1::bigint";

static const char lookup_sql[] =
    "SELECT json_build_object('applications', COALESCE(json_agg(x.j ORDER BY x.id), '[]'::json))::text "
    "FROM (SELECT a.id, " RECORD_JSON_SQL " AS j" APP_STATUS_FROM_SQL
    " WHERE a.event_id = $1 AND a.phone = $2) x";

static void handle_application(struct app *app, struct http_request *req)
{
    const char *id = req->path + strlen("/admin/applications/");
    size_t n = strlen(id);
    /* A positive bigint in plain decimal; anything else cannot name an application. */
    bool ok = n >= 1 && n <= 18 && id[0] != '0';
    for (size_t i = 0; ok && i < n; i++) ok = id[i] >= '0' && id[i] <= '9';
    if (!ok) {
        api_respond_error(req, 404, "not_found", NULL, NULL);
        return;
    }
    log_info("api", "event=admin_read req=%" PRIu64 " application_id=%s", req->id, id);
    const char *params[1] = {id};
    api_run_query(app, req, get_application_sql, 1, params);
}

static void handle_lookup(struct app *app, struct http_request *req)
{
    char event_id[EVENT_ID_MAX_CHARS + 2], phone_raw[32], phone[PHONE_DIGITS_MAX + 1];
    int elen = api_query_param(req->query, "event_id", event_id, sizeof event_id);
    int plen = api_query_param(req->query, "phone", phone_raw, sizeof phone_raw);

    if (elen < 0 || !validate_event_id(event_id, (size_t)elen)) {
        api_respond_bad_field(req, "invalid", "event_id",
                              "query parameter event_id is required: 1-64 characters of A-Z, "
                              "a-z, 0-9, '.', '_', '-'");
        return;
    }
    if (plen < 0 || validate_phone(phone_raw, (size_t)plen, phone) != 0) {
        api_respond_bad_field(req, "invalid", "phone",
                              "query parameter phone is required: a Korean mobile number like "
                              "010-1234-5678");
        return;
    }
    char masked[24];
    log_mask_phone(phone, masked, sizeof masked);
    log_info("api", "event=admin_lookup req=%" PRIu64 " event_id=%s phone=%s", req->id, event_id,
             masked);
    const char *params[2] = {event_id, phone};
    api_run_query(app, req, lookup_sql, 2, params);
}

/* ---- GET /admin/audit?event_id=&since= ---- */

struct audit_job {
    struct admin_job base;   /* first */
    struct audit_opts opts;
    char event_id[EVENT_ID_MAX_CHARS + 1];
    char since[64];
};

static int audit_job_run(struct admin_job *base)
{
    struct audit_job *job = (struct audit_job *)base;
    json_object *report = NULL;
    char err[512] = "";
    int r = audit_run(base->cfg, base->brokers, &job->opts, NULL, &report, err, sizeof err);
    if (r < 0) job_log_failure("audit", "audit_failed", err);
    return job_reply(base, r, report, "audit_failed", err);
}

/* Whether key appears in the query at all (api_query_param's -1 means absent or too long). */
static bool query_has(const char *query, const char *key)
{
    size_t n = strlen(key);
    for (const char *p = query; p && *p;) {
        if (strncmp(p, key, n) == 0 && (p[n] == '=' || p[n] == '&' || p[n] == '\0')) return true;
        p = strchr(p, '&');
        if (p) p++;
    }
    return false;
}

static void handle_audit(struct app *app, struct http_request *req)
{
    struct audit_job *job = job_alloc(req, sizeof *job);
    if (!job) return;
    const char *q = req->query ? req->query : "";
    int n = api_query_param(q, "event_id", job->event_id, sizeof job->event_id);
    if (n > 0) {
        if (!validate_event_id(job->event_id, (size_t)n)) goto bad_event;
        job->opts.event_id = job->event_id;
    } else if (query_has(q, "event_id") && n < 0) {
        goto bad_event;
    }
    n = api_query_param(q, "since", job->since, sizeof job->since);
    if (n > 0) {
        job->opts.since = job->since;
    } else if (query_has(q, "since") && n < 0) {
        bad_request(req, "since: a timestamp, at most 63 bytes");
        free(job);
        return;
    }
    job_start(app, req, &job->base, audit_job_run);
    return;
bad_event:
    bad_request(req, "event_id: 1-64 characters of [A-Za-z0-9._-]");
    free(job);
}

/* ---- GET /admin/trace?phone=&event_id=&scan=1 ---- */

struct trace_job {
    struct admin_job base;   /* first */
    struct trace_opts opts;
    char phone[32];
    char event_id[EVENT_ID_MAX_CHARS + 1];
};

static int trace_job_run(struct admin_job *base)
{
    struct trace_job *job = (struct trace_job *)base;
    json_object *report = NULL;
    char err[512] = "";
    int r = trace_run(base->cfg, base->brokers, &job->opts, NULL, &report, err, sizeof err);
    if (r < 0) job_log_failure("trace", "trace_failed", err);
    return job_reply(base, r, report, "trace_failed", err);
}

static void handle_trace(struct app *app, struct http_request *req)
{
    struct trace_job *job = job_alloc(req, sizeof *job);
    if (!job) return;
    const char *q = req->query ? req->query : "";
    char digits[PHONE_DIGITS_MAX + 1];
    int n = api_query_param(q, "phone", job->phone, sizeof job->phone);
    if (n <= 0 || validate_phone(job->phone, (size_t)n, digits) != 0) {
        bad_request(req, "phone: a Korean mobile number such as 010-1234-5678");
        free(job);
        return;
    }
    job->opts.phone = job->phone;
    n = api_query_param(q, "event_id", job->event_id, sizeof job->event_id);
    if (n > 0) {
        if (!validate_event_id(job->event_id, (size_t)n)) {
            bad_request(req, "event_id: 1-64 characters of [A-Za-z0-9._-]");
            free(job);
            return;
        }
        job->opts.event_id = job->event_id;
    }
    char scan[8];
    if (api_query_param(q, "scan", scan, sizeof scan) > 0)
        job->opts.scan = strcmp(scan, "1") == 0 || strcmp(scan, "true") == 0;
    job_start(app, req, &job->base, trace_job_run);
}

/* ---- GET /admin/report?event_id=E (text/html) ---- */

struct report_job {
    struct admin_job base;   /* first */
    char event_id[EVENT_ID_MAX_CHARS + 1];
};

static int report_job_run(struct admin_job *base)
{
    struct report_job *job = (struct report_job *)base;
    struct report_result res;
    char err[512] = "";
    int r = report_run(base->cfg, base->brokers, job->event_id, &res, err, sizeof err);
    if (r < 0) {
        job_log_failure("report", "report_failed", err);
        return job_reply(base, r, NULL, "report_failed", err);
    }
    base->body = res.html;
    base->content_type = HTML_TYPE;
    return 200;
}

static void handle_report(struct app *app, struct http_request *req)
{
    struct report_job *job = job_alloc(req, sizeof *job);
    if (!job) return;
    int n = api_query_param(req->query ? req->query : "", "event_id", job->event_id,
                            sizeof job->event_id);
    if (n <= 0 || !validate_event_id(job->event_id, (size_t)n)) {
        bad_request(req, "event_id: required, 1-64 characters of [A-Za-z0-9._-]");
        free(job);
        return;
    }
    job_start(app, req, &job->base, report_job_run);
}

/* ---- GET /admin/dlq[?limit=N], POST /admin/dlq/replay ---- */

struct dlq_job {
    struct admin_job base;   /* first */
    size_t limit;
    bool has_event;
    char event_id[UUID_STR_LEN + 1];
};

static int dlq_list_run(struct admin_job *base)
{
    struct dlq_job *job = (struct dlq_job *)base;
    json_object *o = NULL;
    char err[512] = "", qb[600];
    int rc = dlq_list(base->cfg, base->brokers, job->limit, &o, err, sizeof err);
    if (rc != 0) log_error("dlq", "event=list_failed err=%s", log_quoted(err, qb, sizeof qb));
    return job_reply(base, rc, o, "unavailable", err);
}

static int dlq_replay_run(struct admin_job *base)
{
    struct dlq_job *job = (struct dlq_job *)base;
    json_object *o = NULL;
    char err[512] = "", qb[600];
    int rc = dlq_replay(base->cfg, base->brokers, job->has_event ? job->event_id : NULL, &o, err,
                        sizeof err);
    if (rc != 0) log_error("dlq", "event=replay_failed err=%s", log_quoted(err, qb, sizeof qb));
    return job_reply(base, rc, o, "unavailable", err);
}

static void handle_dlq_list(struct app *app, struct http_request *req)
{
    size_t limit = DLQ_LIST_DEFAULT;
    char buf[32];
    int n = api_query_param(req->query ? req->query : "", "limit", buf, sizeof buf);
    if (n > 0) {
        char *end;
        long v = strtol(buf, &end, 10);
        if (*end || v < 1 || v > DLQ_LIST_MAX) {
            bad_request(req, "limit: an integer from 1 to 10000");
            return;
        }
        limit = (size_t)v;
    }
    struct dlq_job *job = job_alloc(req, sizeof *job);
    if (!job) return;
    job->limit = limit;
    job_start(app, req, &job->base, dlq_list_run);
}

static void replay_bad_request(struct http_request *req, const char *field, const char *message)
{
    api_respond_bad_field(req, "bad_request", field, message);
}

/* The body says what to replay, explicitly: {"event_id": "<uuid>"} or {"all": true}.
 * Anything else (empty, null values, unknown or misspelled fields, both, trailing bytes) is
 * a 400 naming the field, so that a typo can never mean "everything". */
static bool parse_replay_body(struct http_request *req, bool *has_event, char *event_id, size_t cap)
{
    static const char usage[] = "body: {\"event_id\": \"<uuid>\"} or {\"all\": true}";
    size_t len = req->body_len;
    const char *b = req->body ? req->body : "";
    while (len && (b[len - 1] == ' ' || b[len - 1] == '\t' || b[len - 1] == '\r' || b[len - 1] == '\n'))
        len--;
    if (len == 0) {
        replay_bad_request(req, "body", usage);
        return false;
    }
    json_tokener *tok = json_tokener_new();
    if (!tok) {
        api_respond_error(req, 503, "unavailable", NULL, API_RETRY_AFTER_1);
        return false;
    }
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    json_object *o = json_tokener_parse_ex(tok, b, (int)len);
    bool whole = json_tokener_get_error(tok) == json_tokener_success &&
                 json_tokener_get_parse_end(tok) == len;
    json_tokener_free(tok);
    if (!o || !whole || !json_object_is_type(o, json_type_object)) {
        json_object_put(o);
        replay_bad_request(req, "body", usage);
        return false;
    }
    bool ok = true, all = false;
    *has_event = false;
    json_object_object_foreach(o, key, v) {
        if (!ok) break;
        if (strcmp(key, "event_id") == 0) {
            const char *e = json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
            if (!e || !effects_is_uuid(e, strlen(e))) {
                replay_bad_request(req, "event_id", "event_id: a UUID (the ce_id) as a string");
                ok = false;
            } else {
                snprintf(event_id, cap, "%s", e);
                *has_event = true;
            }
        } else if (strcmp(key, "all") == 0) {
            if (!json_object_is_type(v, json_type_boolean) || !json_object_get_boolean(v)) {
                replay_bad_request(req, "all", "all: true (the only value; to replay one event "
                                               "give event_id instead)");
                ok = false;
            }
            all = true;
        } else {
            char msg[160];
            snprintf(msg, sizeof msg, "unknown field \"%.60s\"; %s", key, usage);
            replay_bad_request(req, key, msg);
            ok = false;
        }
    }
    json_object_put(o);
    if (ok && *has_event == all) {
        replay_bad_request(req, "body", *has_event ? "give event_id or all, not both" : usage);
        ok = false;
    }
    return ok;
}

static void handle_dlq_replay(struct app *app, struct http_request *req)
{
    bool has_event = false;
    char event_id[UUID_STR_LEN + 1] = "";
    if (!parse_replay_body(req, &has_event, event_id, sizeof event_id)) return;
    struct dlq_job *job = job_alloc(req, sizeof *job);
    if (!job) return;
    job->has_event = has_event;
    memcpy(job->event_id, event_id, sizeof event_id);
    job_start(app, req, &job->base, dlq_replay_run);
}

/* ---- routing ---- */

/* First match wins: exact paths before prefixes that could cover them. */
static const struct api_route routes[] = {
    {HTTP_GET, "/admin/applications", false, "admin_lookup", handle_lookup},
    {HTTP_GET, "/admin/applications/", true, "admin_application", handle_application},
    {HTTP_GET, "/admin/audit", false, "admin_audit", handle_audit},
    {HTTP_GET, "/admin/trace", false, "admin_trace", handle_trace},
    {HTTP_GET, "/admin/dlq", false, "admin_dlq", handle_dlq_list},
    {HTTP_POST, "/admin/dlq/replay", false, "admin_dlq_replay", handle_dlq_replay},
    {HTTP_GET, "/admin/report", false, "admin_report", handle_report},
};

#define NROUTES (sizeof routes / sizeof routes[0])

void admin_http_handle(struct app *app, struct http_request *req)
{
    api_dispatch(app, req, routes, NROUTES, authorized);
}

const char *admin_http_label(const struct http_request *req)
{
    return api_route_label(routes, NROUTES, req);
}
