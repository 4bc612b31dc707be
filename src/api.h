/* api: routes HTTP requests to handlers and maps outcomes to status codes and JSON bodies.
 * The one table of error -> HTTP status lives here; /admin/... goes to admin_http.h. */
#ifndef TICKETD_API_H
#define TICKETD_API_H

#include <json-c/json.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

#include "app.h"
#include "http_server.h"

/* The http_handler_fn for the server; ud is the struct app. */
void api_handle(struct http_request *req, void *ud);

/* A route: exact path, or a prefix (with something after it) when prefix is true. */
typedef void (*api_route_fn)(struct app *app, struct http_request *req);
struct api_route {
    int method;          /* llhttp_method_t */
    const char *path;
    bool prefix;
    const char *label;   /* route label in metrics */
    api_route_fn handler;
};

/* Runs the first route of routes[0..n) matching req; 404, or 405 with Allow, when none does.
 * When guard is not NULL it runs between the match and the handler (false: it answered). */
void api_dispatch(struct app *app, struct http_request *req, const struct api_route *routes,
                  size_t n, bool (*guard)(struct app *app, struct http_request *req));
/* The metrics label of req among routes: the matched route's, "method_not_allowed" or
 * "not_found" (a fixed set, whatever the path). */
const char *api_route_label(const struct api_route *routes, size_t n,
                            const struct http_request *req);

/* Shared by the public and the admin routes. */
#define API_JSON_TYPE "application/json"
#define API_RETRY_AFTER_1 "Retry-After: 1\r\n" /* an extra_headers line */

/* The one exit of every response (counted in the HTTP metrics); req is gone afterwards. */
void api_respond(struct http_request *req, int status, const char *content_type,
                 const char *body, size_t len, const char *extra_headers);
/* Answers with the JSON of obj (takes the reference) and the given status. */
void api_respond_json(struct http_request *req, int status, json_object *obj,
                      const char *extra_headers);
/* {"error": code, "message": msg} */
void api_respond_error(struct http_request *req, int status, const char *code,
                       const char *message, const char *extra_headers);

/* 400 {"error": code, "field": field, "message": msg}: bad input, naming what was wrong. */
void api_respond_bad_field(struct http_request *req, const char *code, const char *field,
                           const char *message);

/* Runs sql (one row, one JSON text column) on the API pool's read class and answers req with
 * it: 200, 404 when there is no row or it is NULL, 503 when the database cannot answer. */
void api_run_query(struct app *app, struct http_request *req, const char *sql, int nparams,
                   const char *const *params);

/* Decodes the value of key in a query string ("a=1&b=x%2By") into out; returns length or -1. */
int api_query_param(const char *query, const char *key, char *out, size_t outlen);

#endif
