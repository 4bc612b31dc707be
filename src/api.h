/* api: routes HTTP requests to handlers and maps outcomes to status codes and JSON bodies.
 * The one table of error -> HTTP status lives here. */
#ifndef TICKETD_API_H
#define TICKETD_API_H

#include <json-c/json.h>

#include "app.h"
#include "http_server.h"

/* The http_handler_fn for the server; ud is the struct app. */
void api_handle(struct http_request *req, void *ud);

/* Answers with the JSON of obj (takes the reference) and the given status. */
void api_respond_json(struct http_request *req, int status, json_object *obj,
                      const char *extra_headers);
/* {"error": code, "message": msg} */
void api_respond_error(struct http_request *req, int status, const char *code,
                       const char *message, const char *extra_headers);

/* 400 {"error": code, "field": field, "message": msg}: bad input, naming what was wrong. */
void api_respond_bad_field(struct http_request *req, const char *code, const char *field,
                           const char *message);

/* true when the request carries "Authorization: Bearer <ADMIN_TOKEN>" (constant-time
 * compare). Otherwise answers 401 (or 403 when no token is configured) and returns false. */
bool api_admin_authorized(struct app *app, struct http_request *req);

/* Runs work(arg) on libuv's thread pool (admin tools use blocking libpq/rdkafka calls,
 * which must never run on the loop), then answers req with the status and JSON body it
 * returns (*body malloc'd, freed here; sent as text/html when it starts with "<!DOCTYPE html>"). arg is freed with free_arg (may be NULL) afterwards. */
typedef int (*api_blocking_fn)(void *arg, char **body);
void api_run_blocking(struct app *app, struct http_request *req, api_blocking_fn work,
                      void *arg, void (*free_arg)(void *));

/* Decodes the value of key in a query string ("a=1&b=x%2By") into out; returns length or -1. */
int api_query_param(const char *query, const char *key, char *out, size_t outlen);

#endif
