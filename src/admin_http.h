/* admin_http (admin_http_): the HTTP side of the admin tools, every /admin/... route.
 *
 * Authorization happens here, once, for all of them: "Authorization: Bearer <ADMIN_TOKEN>"
 * compared in constant time; 401 otherwise, 403 when ADMIN_TOKEN is not set (admin is then
 * disabled). The reports (audit.h, trace.h, dlq.h, report.h) are blocking functions; this
 * adapter runs them on libuv's thread pool (uv_queue_work), never on the loop. api.c hands
 * every /admin/... request here and knows nothing else of admin. */
#ifndef TICKETD_ADMIN_HTTP_H
#define TICKETD_ADMIN_HTTP_H

#include "app.h"
#include "http_server.h"

/* Routes req (its path starts with "/admin/"): 404/405 for no route, then the token check,
 * then the handler. */
void admin_http_handle(struct app *app, struct http_request *req);

/* The metrics label of req (a path under /admin/): a route's, "method_not_allowed" or
 * "not_found". */
const char *admin_http_label(const struct http_request *req);

#endif
