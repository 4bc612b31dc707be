/* Unit tests of metrics.c: Prometheus text format of counters, gauges and histograms
 * (default and custom buckets), labels, HELP/TYPE once per name, collectors and reset. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "check.h"


static int count_of(const char *haystack, const char *needle)
{
    int n = 0;
    for (const char *p = haystack; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

static void test_counters_gauges(void)
{
    metrics_reset();
    metrics_describe("ticketd_test_requests_total", "counter", "Requests.");
    metrics_counter_add("ticketd_test_requests_total", "route=\"apply\",code=\"201\"", 1);
    metrics_counter_add("ticketd_test_requests_total", "route=\"apply\",code=\"201\"", 2);
    metrics_counter_add("ticketd_test_requests_total", "route=\"apply\",code=\"409\"", 1);
    metrics_counter_add("ticketd_test_plain_total", NULL, 0.5);
    metrics_gauge_set("ticketd_test_backlog", NULL, 12);
    metrics_gauge_set("ticketd_test_backlog", NULL, 7);
    metrics_gauge_set("ticketd_test_lag", "partition=\"3\"", -2);

    size_t len = 0;
    char *t = metrics_render(&len);
    CHECK(t && strlen(t) == len, "render returns its length");
    CHECK(strstr(t, "# HELP ticketd_test_requests_total Requests.\n"), "HELP line");
    CHECK(strstr(t, "# TYPE ticketd_test_requests_total counter\n"), "TYPE counter line");
    CHECK(count_of(t, "# TYPE ticketd_test_requests_total") == 1, "TYPE once per name");
    CHECK(strstr(t, "ticketd_test_requests_total{route=\"apply\",code=\"201\"} 3\n"),
          "counter with labels accumulates");
    CHECK(strstr(t, "ticketd_test_requests_total{route=\"apply\",code=\"409\"} 1\n"),
          "second series of the same name");
    CHECK(strstr(t, "# TYPE ticketd_test_plain_total counter\nticketd_test_plain_total 0.5\n"),
          "undescribed counter typed counter, no labels, fractional value");
    CHECK(strstr(t, "# TYPE ticketd_test_backlog gauge\nticketd_test_backlog 7\n"), "gauge set overwrites");
    CHECK(strstr(t, "ticketd_test_lag{partition=\"3\"} -2\n"), "negative gauge");
    CHECK(!strstr(t, "# HELP ticketd_test_backlog"), "no HELP without help text");
    free(t);

    /* wrong type for an existing name is ignored, not mixed in */
    metrics_gauge_set("ticketd_test_requests_total", "route=\"x\"", 5);
    t = metrics_render(NULL);
    CHECK(!strstr(t, "route=\"x\""), "gauge_set on a counter name ignored");
    free(t);
}

static void test_histograms(void)
{
    metrics_reset();
    metrics_describe("ticketd_test_seconds", "histogram", "Latency.");
    metrics_observe("ticketd_test_seconds", "route=\"apply\"", 0.0001);  /* le=0.0001 */
    metrics_observe("ticketd_test_seconds", "route=\"apply\"", 0.003);   /* le=0.005 */
    metrics_observe("ticketd_test_seconds", "route=\"apply\"", 42);      /* +Inf only */
    double bounds[] = {1, 8, 64};
    metrics_observe_buckets("ticketd_test_batch_size", NULL, 8, bounds, 3);
    metrics_observe_buckets("ticketd_test_batch_size", NULL, 100, bounds, 3);

    char *t = metrics_render(NULL);
    CHECK(strstr(t, "# TYPE ticketd_test_seconds histogram\n"), "TYPE histogram");
    CHECK(strstr(t, "ticketd_test_seconds_bucket{route=\"apply\",le=\"0.0001\"} 1\n"),
          "bucket bound is inclusive (le)");
    CHECK(strstr(t, "ticketd_test_seconds_bucket{route=\"apply\",le=\"0.0025\"} 1\n"),
          "cumulative below an observation");
    CHECK(strstr(t, "ticketd_test_seconds_bucket{route=\"apply\",le=\"0.005\"} 2\n"),
          "cumulative at 0.005");
    CHECK(strstr(t, "ticketd_test_seconds_bucket{route=\"apply\",le=\"10\"} 2\n"),
          "largest default bucket is 10 s");
    CHECK(strstr(t, "ticketd_test_seconds_bucket{route=\"apply\",le=\"+Inf\"} 3\n"), "+Inf bucket");
    CHECK(strstr(t, "ticketd_test_seconds_sum{route=\"apply\"} 42.0031\n"), "sum");
    CHECK(strstr(t, "ticketd_test_seconds_count{route=\"apply\"} 3\n"), "count");
    CHECK(count_of(t, "ticketd_test_seconds_bucket{") == 17, "16 default buckets + Inf");
    CHECK(strstr(t, "ticketd_test_batch_size_bucket{le=\"1\"} 0\n") &&
              strstr(t, "ticketd_test_batch_size_bucket{le=\"8\"} 1\n") &&
              strstr(t, "ticketd_test_batch_size_bucket{le=\"64\"} 1\n") &&
              strstr(t, "ticketd_test_batch_size_bucket{le=\"+Inf\"} 2\n"),
          "custom buckets without labels");
    CHECK(strstr(t, "ticketd_test_batch_size_sum 108\n") &&
              strstr(t, "ticketd_test_batch_size_count 2\n"),
          "sum/count without labels");
    free(t);
}

static int collector_calls;
static void collector(void *ud)
{
    collector_calls++;
    metrics_gauge_set("ticketd_test_collected", NULL, *(double *)ud);
}

static void test_collectors_and_reset(void)
{
    metrics_reset();
    static double value = 5;
    metrics_add_collector(collector, &value);
    char *t = metrics_render(NULL);
    CHECK(collector_calls == 1 && strstr(t, "ticketd_test_collected 5\n"), "collector ran before render");
    free(t);
    value = 6;
    t = metrics_render(NULL);
    CHECK(collector_calls == 2 && strstr(t, "ticketd_test_collected 6\n"), "collector refreshes each render");
    free(t);

    /* many series: the table grows */
    for (int i = 0; i < 2000; i++) {
        char labels[32];
        snprintf(labels, sizeof labels, "i=\"%d\"", i);
        metrics_counter_add("ticketd_test_many_total", labels, i);
    }
    t = metrics_render(NULL);
    CHECK(count_of(t, "ticketd_test_many_total{") == 2000 &&
              strstr(t, "ticketd_test_many_total{i=\"1999\"} 1999\n"),
          "2000 series kept apart");
    free(t);

    metrics_reset();
    t = metrics_render(NULL);
    CHECK(t && t[0] == '\0' && collector_calls == 3,
          "reset drops series and collectors");
    free(t);
}

int main(void)
{
    test_counters_gauges();
    test_histograms();
    test_collectors_and_reset();
    return CHECK_SUMMARY();
}
