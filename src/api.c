/* api: the route table, the handlers of the public API, and the one place that maps
 * outcomes to HTTP status codes and JSON bodies.
 *
 * Status mapping (ingest outcome -> reply):
 *   CREATED, REPLAYED -> 201 {"reference":...} (REPLAYED adds "Idempotent-Replayed: true")
 *   DUPLICATE         -> 409 {"error":"already_applied"} (no reference: a stranger who knows
 *                        someone's phone must not get their handle)
 *   KEY_IN_FLIGHT     -> 409 {"error":"idempotency_key_in_flight"}, Retry-After: 1
 *   KEY_MISMATCH      -> 422 {"error":"idempotency_key_reused"}
 *   UNAVAILABLE       -> 503 {"error":"unavailable"}, Retry-After: 1
 *   OVERLOADED        -> 503 {"error":"overloaded"}, Retry-After: 1-3 (jittered by ingest)
 * Overload is answered with 503 rather than 429: it is the server shedding load, not a
 * client exceeding a quota, and load balancers and clients treat 503 + Retry-After as
 * "try again shortly, maybe elsewhere".
 *
 * Who may read what (docs/PRIVACY.md): the public API knows applications only by their
 * random reference and answers status and a masked phone; full records and the lookup by
 * (event_id, phone) are admin routes behind the bearer token, in admin_http.c, which gets
 * every /admin/... request.
 *
 * Every response the handlers send goes through api_respond(), which counts it in
 * ticketd_http_requests_total{route,code} and ticketd_http_request_duration_seconds{route}. */
#include "api.h"

#include <errno.h>
#include <inttypes.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "admin_http.h"
#include "app_status.h"
#include "consumer.h"
#include "db_pool.h"
#include "ingest.h"
#include "limits.h"
#include "log.h"
#include "metrics.h"
#include "outbox_relay.h"
#include "validate.h"


static void handle_apply(struct app *app, struct http_request *req);
static void handle_get_status(struct app *app, struct http_request *req);
static void handle_healthz(struct app *app, struct http_request *req);
static void handle_readyz(struct app *app, struct http_request *req);
static void handle_metrics(struct app *app, struct http_request *req);

/* First match wins: exact paths before prefixes that could cover them. */
static const struct api_route public_routes[] = {
    {HTTP_POST, "/v1/applications", false, "apply", handle_apply},
    {HTTP_GET, "/v1/applications/", true, "application_status", handle_get_status},
    {HTTP_GET, "/healthz", false, "healthz", handle_healthz},
    {HTTP_GET, "/readyz", false, "readyz", handle_readyz},
    {HTTP_GET, "/metrics", false, "metrics", handle_metrics},
};

#define NROUTES (sizeof public_routes / sizeof public_routes[0])

static bool route_matches_path(const struct api_route *r, const char *path)
{
    if (r->prefix) {
        size_t n = strlen(r->path);
        return strncmp(path, r->path, n) == 0 && path[n] != '\0';
    }
    return strcmp(path, r->path) == 0;
}

static const struct api_route *find_route(const struct api_route *routes, size_t n,
                                          int method, const char *path)
{
    for (size_t i = 0; i < n; i++)
        if (routes[i].method == method && route_matches_path(&routes[i], path)) return &routes[i];
    return NULL;
}

static bool is_admin_path(const char *path)
{
    return strncmp(path, "/admin/", 7) == 0;
}

const char *api_route_label(const struct api_route *routes, size_t n,
                            const struct http_request *req)
{
    const struct api_route *r = find_route(routes, n, req->method, req->path);
    if (r) return r->label;
    for (size_t i = 0; i < n; i++)
        if (route_matches_path(&routes[i], req->path)) return "method_not_allowed";
    return "not_found";
}

/* The label a response is counted under: the matched route, or a fixed bucket so that
 * arbitrary paths cannot grow the metric's cardinality. */
static const char *route_label(const struct http_request *req)
{
    if (is_admin_path(req->path)) return admin_http_label(req);
    return api_route_label(public_routes, NROUTES, req);
}

/* The label strings of one (route, status) pair. Route labels are static strings, so a
 * small cache keyed by their address saves formatting them for every response. */
struct response_labels {
    const char *label;
    int status;
    char route_code[96];
    char route[80];
};

static const struct response_labels *response_labels(const char *label, int status)
{
    static struct response_labels cache[32];
    size_t i = (((uintptr_t)label >> 3) * 31u + (unsigned)status) % (sizeof cache / sizeof cache[0]);
    struct response_labels *l = &cache[i];
    if (l->label != label || l->status != status) {
        l->label = label;
        l->status = status;
        snprintf(l->route_code, sizeof l->route_code, "route=\"%s\",code=\"%d\"", label, status);
        snprintf(l->route, sizeof l->route, "route=\"%s\"", label);
    }
    return l;
}

static void count_response(const struct http_request *req, int status)
{
    static bool described;
    if (!described) {
        metrics_describe("ticketd_http_requests_total", "counter",
                         "HTTP requests answered by the API, by route and status code");
        metrics_describe("ticketd_http_request_duration_seconds", "histogram",
                         "Time from a complete request head to the response, by route");
        described = true;
    }
    const struct response_labels *l = response_labels(route_label(req), status);
    metrics_counter_add("ticketd_http_requests_total", l->route_code, 1);
    double seconds = (double)(uv_hrtime() - req->start_ns) / 1e9;
    metrics_observe("ticketd_http_request_duration_seconds", l->route, seconds);
}

void api_respond(struct http_request *req, int status, const char *content_type,
                     const char *body, size_t len, const char *extra_headers)
{
    count_response(req, status);
    http_respond(req, status, content_type, body, len, extra_headers);
}

void api_respond_json(struct http_request *req, int status, json_object *obj,
                      const char *extra_headers)
{
    size_t len = 0;
    const char *text = json_object_to_json_string_length(
        obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    if (!text) {
        text = "{\"error\":\"internal\"}";
        len = strlen(text);
        status = 500;
    }
    api_respond(req, status, API_JSON_TYPE, text, len, extra_headers);
    json_object_put(obj);
}

void api_respond_error(struct http_request *req, int status, const char *code,
                       const char *message, const char *extra_headers)
{
    json_object *obj = json_object_new_object();
    json_object_object_add(obj, "error", json_object_new_string(code));
    if (message) json_object_object_add(obj, "message", json_object_new_string(message));
    api_respond_json(req, status, obj, extra_headers);
}

/* ---- routing ---- */

static const char *method_name(int method)
{
    return llhttp_method_name((llhttp_method_t)method);
}

static void respond_method_not_allowed(struct http_request *req,
                                       const struct api_route *routes, size_t nroutes)
{
    char allow[128] = "Allow: ";
    size_t used = strlen(allow);
    bool first = true;
    for (size_t i = 0; i < nroutes; i++) {
        if (!route_matches_path(&routes[i], req->path)) continue;
        const char *m = method_name(routes[i].method);
        if (strstr(allow, m)) continue; /* listed already (several routes, one method) */
        int n = snprintf(allow + used, sizeof allow - used, "%s%s", first ? "" : ", ", m);
        if (n < 0 || (size_t)n >= sizeof allow - used) break;
        used += (size_t)n;
        first = false;
    }
    snprintf(allow + used, sizeof allow - used, "\r\n");
    api_respond_error(req, 405, "method_not_allowed", NULL, allow);
}

#ifdef TICKETD_CANNED
/* Only in the bench binary ticketd-canned (CMakeLists.txt), never in ticketd: the HTTP
 * ceiling of bench/rush, a 201 with no parsing, no DB, no metrics. */
static void respond_canned(struct http_request *req)
{
    static const char canned[] = "{\"reference\":\"00000000-0000-4000-8000-000000000000\","
                                 "\"event_id\":\"canned\",\"status\":\"applied\","
                                 "\"created_at\":\"2026-01-01T00:00:00.000000Z\"}";
    http_respond(req, 201, API_JSON_TYPE, canned, sizeof canned - 1, NULL);
}
#endif

void api_handle(struct http_request *req, void *ud)
{
    struct app *app = ud;

#ifdef TICKETD_CANNED
    if (req->method == HTTP_POST && strcmp(req->path, "/v1/applications") == 0) {
        respond_canned(req);
        return;
    }
#endif
    if (is_admin_path(req->path)) {
        admin_http_handle(app, req);
        return;
    }
    api_dispatch(app, req, public_routes, NROUTES, NULL);
}

void api_dispatch(struct app *app, struct http_request *req, const struct api_route *routes,
                  size_t n, bool (*guard)(struct app *app, struct http_request *req))
{
    const struct api_route *r = find_route(routes, n, req->method, req->path);
    if (!r) {
        for (size_t i = 0; i < n; i++) {
            if (route_matches_path(&routes[i], req->path)) {
                respond_method_not_allowed(req, routes, n);
                return;
            }
        }
        api_respond_error(req, 404, "not_found", NULL, NULL);
        return;
    }
    if (guard && !guard(app, req)) return;
    r->handler(app, req);
}

/* ---- query strings ---- */

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes s[0..len) ('+' is a space, %XX a byte) into out; -1 on a bad escape, a decoded
 * NUL or when it does not fit. */
static int url_decode(const char *s, size_t len, char *out, size_t outlen)
{
    size_t o = 0;
    if (outlen == 0) return -1;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            if (i + 2 >= len) return -1;
            int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
            if (hi < 0 || lo < 0) return -1;
            c = (char)(hi * 16 + lo);
            if (c == '\0') return -1;
            i += 2;
        }
        if (o + 1 >= outlen) return -1;
        out[o++] = c;
    }
    out[o] = '\0';
    return (int)o;
}

int api_query_param(const char *query, const char *key, char *out, size_t outlen)
{
    if (!query || !key || !out) return -1;
    const char *p = query;
    while (*p) {
        const char *amp = strchr(p, '&');
        const char *end = amp ? amp : p + strlen(p);
        const char *eq = memchr(p, '=', (size_t)(end - p));
        const char *kend = eq ? eq : end;
        char name[64];
        if (url_decode(p, (size_t)(kend - p), name, sizeof name) >= 0 && strcmp(name, key) == 0) {
            if (!eq) {
                if (outlen == 0) return -1;
                out[0] = '\0';
                return 0;
            }
            return url_decode(eq + 1, (size_t)(end - eq - 1), out, outlen);
        }
        if (!amp) break;
        p = amp + 1;
    }
    return -1;
}

/* ---- POST /v1/applications ---- */

/* "application/json", any case, optionally followed by parameters (charset=utf-8). */
static bool is_json_content_type(const char *ct)
{
    if (!ct) return false;
    while (*ct == ' ' || *ct == '\t') ct++;
    static const char json[] = "application/json";
    if (strncasecmp(ct, json, sizeof json - 1) != 0) return false;
    const char *rest = ct + sizeof json - 1;
    while (*rest == ' ' || *rest == '\t') rest++;
    return *rest == '\0' || *rest == ';';
}

static bool idempotency_key_ok(const char *key)
{
    size_t n = strlen(key);
    if (n < 1 || n > IDEMPOTENCY_KEY_MAX_BYTES) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] > 0x7E) return false;
    return true;
}

void api_respond_bad_field(struct http_request *req, const char *code, const char *field,
                           const char *message)
{
    json_object *obj = json_object_new_object();
    json_object_object_add(obj, "error", json_object_new_string(code));
    json_object_object_add(obj, "field", json_object_new_string(field));
    json_object_object_add(obj, "message", json_object_new_string(message));
    api_respond_json(req, 400, obj, NULL);
}

static void respond_invalid(struct http_request *req, const char *field, const char *message)
{
    api_respond_bad_field(req, "invalid", field, message);
}

struct apply_ctx {
    struct http_request *req;
    char event_id[EVENT_ID_MAX_CHARS + 1];
};

static char *append(char *p, const char *end, const char *s)
{
    size_t n = strlen(s);
    if (n > (size_t)(end - p)) n = (size_t)(end - p);
    memcpy(p, s, n);
    return p + n;
}

/* {"reference":"R","event_id":"E","status":"applied","created_at":"C"} into buf
 * (NUL-terminated, truncated like snprintf would); returns its length. */
static int format_created(char *buf, size_t cap, const char *reference, const char *event_id,
                          const char *created_at)
{
    char *p = buf, *end = buf + cap - 1;
    p = append(p, end, "{\"reference\":\"");
    p = append(p, end, reference);
    p = append(p, end, "\",\"event_id\":\"");
    p = append(p, end, event_id);
    p = append(p, end, "\",\"status\":\"applied\",\"created_at\":\"");
    p = append(p, end, created_at);
    p = append(p, end, "\"}");
    *p = '\0';
    return (int)(p - buf);
}

static void on_applied(void *ud, const struct ingest_result *res)
{
    struct apply_ctx *ctx = ud;
    struct http_request *req = ctx->req;
    char body[256];
    int n;

    switch (res->status) {
    case INGEST_CREATED:
    case INGEST_REPLAYED:
        /* event_id is [A-Za-z0-9._-], reference and created_at come from the DB: no escaping
         * needed. Built by hand (the hot path; snprintf cost more than the rest of this
         * function). */
        n = format_created(body, sizeof body, res->reference, ctx->event_id, res->created_at);
        api_respond(req, 201, API_JSON_TYPE, body, (size_t)n,
                 res->status == INGEST_REPLAYED ? "Idempotent-Replayed: true\r\n" : NULL);
        return;
    case INGEST_DUPLICATE:
        api_respond_error(req, 409, "already_applied",
                          "an application for this event and phone number exists already", NULL);
        return;
    case INGEST_KEY_IN_FLIGHT:
        api_respond_error(req, 409, "idempotency_key_in_flight",
                          "a request with this Idempotency-Key is still being processed; retry "
                          "shortly for its answer", API_RETRY_AFTER_1);
        return;
    case INGEST_KEY_MISMATCH:
        api_respond_error(req, 422, "idempotency_key_reused",
                          "this Idempotency-Key was used with a different request body; use a new "
                          "key for a new request", NULL);
        return;
    case INGEST_NSTATUS:
        break;
    case INGEST_OVERLOADED: {
        char retry[32];
        snprintf(retry, sizeof retry, "Retry-After: %d\r\n",
                 res->retry_after_s > 0 ? res->retry_after_s : 1);
        api_respond_error(req, 503, "overloaded", "too many pending applications, retry shortly",
                          retry);
        return;
    }
    case INGEST_UNAVAILABLE:
        break;
    }
    log_debug("api", "event=apply_unavailable req=%" PRIu64 " err=%s", req->id,
              res->error ? res->error : "-");
    api_respond_error(req, 503, "unavailable", "the database is unavailable, retry shortly",
                      API_RETRY_AFTER_1);
}

static void handle_apply(struct app *app, struct http_request *req)
{
    if (!is_json_content_type(req->content_type)) {
        api_respond_error(req, 415, "unsupported_media_type",
                          "Content-Type must be application/json", NULL);
        return;
    }
    if (req->idempotency_key && !idempotency_key_ok(req->idempotency_key)) {
        respond_invalid(req, "Idempotency-Key", "must be 1-128 printable ASCII characters");
        return;
    }
    struct application_in in;
    struct field_error err;
    if (validate_application(req->body, req->body_len, &in, &err) != 0) {
        respond_invalid(req, err.field, err.message);
        return;
    }
    struct apply_ctx *ctx = http_request_alloc(req, sizeof *ctx);
    ctx->req = req;
    memcpy(ctx->event_id, in.event_id, sizeof ctx->event_id);
    ingest_submit(app->ingest, &in, req->idempotency_key, on_applied, ctx);
}

/* ---- GET /v1/applications/{reference} ---- */

/* What the applicant (anyone holding the reference) sees: no name, no e-mail, the phone
 * masked like log_mask_phone. */
#define APPLICATION_PUBLIC_JSON_SQL                                                            \
    "json_build_object("                                                                       \
    "'reference', a.reference, 'event_id', a.event_id, "                                       \
    "'status', " APP_STATUS_SQL ", "                                                           \
    "'phone', CASE length(a.phone) "                                                           \
    "  WHEN 11 THEN substr(a.phone,1,3)||'-****-'||substr(a.phone,8,4) "                       \
    "  WHEN 10 THEN substr(a.phone,1,3)||'-***-'||substr(a.phone,7,4) "                        \
    "  ELSE '***' END, "                                                                       \
    "'seats', a.seats, 'created_at', " DBP_RFC3339_UTC("a.created_at") ")"

static const char get_status_sql[] =
    "SELECT " APPLICATION_PUBLIC_JSON_SQL "::text" APP_STATUS_FROM_SQL " WHERE a.reference = $1::uuid";

struct query_ctx {
    struct http_request *req;
    bool not_found_when_empty;
};

static void on_query_result(void *ud, const PGresult *res, const char *error)
{
    struct query_ctx *ctx = ud;
    struct http_request *req = ctx->req;

    if (!res) {
        char qb[320];
        log_warn("api", "event=query_failed req=%" PRIu64 " err=%s", req->id,
                 log_quoted(error ? error : "unknown", qb, sizeof qb));
        api_respond_error(req, 503, "unavailable", "the database is unavailable, retry shortly",
                          API_RETRY_AFTER_1);
        return;
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        char quoted[256];
        log_error("api", "event=query_error req=%" PRIu64 " err=%s", req->id,
                  log_quoted(PQresultErrorMessage(res), quoted, sizeof quoted));
        api_respond_error(req, 500, "internal", NULL, NULL);
        return;
    }
    if (PQntuples(res) == 0 || PQgetisnull(res, 0, 0)) {
        api_respond_error(req, 404, "not_found", NULL, NULL);
        return;
    }
    api_respond(req, 200, API_JSON_TYPE, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0), NULL);
}

void api_run_query(struct app *app, struct http_request *req, const char *sql, int nparams,
                      const char *const *params)
{
    struct query_ctx *ctx = http_request_alloc(req, sizeof *ctx);
    ctx->req = req;
    int rc = dbp_query_class(app->db, DBP_READ, sql, nparams, params, on_query_result, ctx);
    if (rc < 0) {
        api_respond_error(req, 503, "unavailable",
                          rc == -EAGAIN ? "too many reads queued, retry shortly"
                                        : "the database is unavailable, retry shortly",
                          API_RETRY_AFTER_1);
    }
}

/* A UUID in its 36-character text form (8-4-4-4-12 hex digits). */
static bool is_uuid_text(const char *s)
{
    if (strlen(s) != 36) return false;
    for (int i = 0; i < 36; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-' : hex_value(s[i]) < 0) return false;
    }
    return true;
}

static void handle_get_status(struct app *app, struct http_request *req)
{
    const char *ref = req->path + strlen("/v1/applications/");
    /* Anything else cannot name an application: 404 without asking the database (which also
     * answers a walk over 1, 2, 3, ... exactly like one over random strings). */
    if (!is_uuid_text(ref)) {
        api_respond_error(req, 404, "not_found", NULL, NULL);
        return;
    }
    const char *params[1] = {ref};
    api_run_query(app, req, get_status_sql, 1, params);
}

/* ---- health, readiness, metrics ---- */

static void handle_healthz(struct app *app, struct http_request *req)
{
    static const char ok[] = "{\"status\":\"ok\"}";
    api_respond(req, 200, API_JSON_TYPE, ok, sizeof ok - 1, NULL);
}

static void handle_readyz(struct app *app, struct http_request *req)
{
    const char *reason = NULL;
    if (app->draining) reason = "draining";
    else if (!app->db || dbp_connected(app->db) == 0) reason = "database";
    else if (app->relay && !relay_kafka_ready(app->relay)) reason = "kafka";
    /* A consumer-only replica is ready once it joined its group; with the API role the
     * group join (seconds, longer after a rebalance) must not hold the API back. */
    else if (app->consumer && !app->cfg->role_api && !consumer_ready(app->consumer))
        reason = "consumer";
    if (reason) {
        json_object *obj = json_object_new_object();
        json_object_object_add(obj, "status", json_object_new_string("not_ready"));
        json_object_object_add(obj, "reason", json_object_new_string(reason));
        api_respond_json(req, 503, obj, NULL);
        return;
    }
    static const char ready[] = "{\"status\":\"ready\"}";
    api_respond(req, 200, API_JSON_TYPE, ready, sizeof ready - 1, NULL);
}

static void handle_metrics(struct app *app, struct http_request *req)
{
    /* Counted before rendering, so a scrape sees itself. */
    count_response(req, 200);
    size_t len = 0;
    char *text = metrics_render(&len);
    http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len, NULL);
    free(text);
}
