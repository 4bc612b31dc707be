/* metrics: a small in-process registry rendered as Prometheus text (GET /metrics).
 * Series are found by (name, labels) so any module can count without registering first;
 * names follow Prometheus conventions (ticketd_<what>_<unit>[_total]).
 *
 *   metrics_counter_add("ticketd_http_requests_total", "route=\"apply\",code=\"201\"", 1);
 *   metrics_observe("ticketd_http_request_duration_seconds", "route=\"apply\"", 0.0012);
 *   metrics_gauge_set("ticketd_outbox_backlog", NULL, 12);
 *
 * Single-threaded: call only from the loop thread. */
#ifndef TICKETD_METRICS_H
#define TICKETD_METRICS_H

#include <stddef.h>

/* help is used the first time a name is seen (may be NULL). */
void metrics_describe(const char *name, const char *type, const char *help);
void metrics_counter_add(const char *name, const char *labels, double v);
void metrics_gauge_set(const char *name, const char *labels, double v);
/* Histogram in seconds, fixed buckets from 100 us to 10 s. */
void metrics_observe(const char *name, const char *labels, double seconds);
/* Histogram with caller-chosen bucket bounds (used the first time the series is seen),
 * e.g. group-commit batch sizes. */
void metrics_observe_buckets(const char *name, const char *labels, double v,
                             const double *bounds, size_t nbounds);

/* Collectors run before each render to refresh gauges computed on demand. */
typedef void (*metrics_collector_fn)(void *ud);
void metrics_add_collector(metrics_collector_fn fn, void *ud);

/* Renders all series; returns a malloc'd NUL-terminated string (caller frees). */
char *metrics_render(size_t *len);

void metrics_reset(void); /* tests */

#endif
