/* metrics: registry of families (one per metric name: type, help) and series (one per
 * name + label set), found through a chained hash table so callers never register first.
 * The header says loop thread only; a mutex still guards the registry so a stray call from
 * the thread pool cannot corrupt it (collectors run outside the lock, they set gauges). */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strbuf.h"

enum metric_type { MT_COUNTER, MT_GAUGE, MT_HISTOGRAM, MT_UNTYPED };

static const char *const type_names[] = {"counter", "gauge", "histogram", "untyped"};

static const double default_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                        0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                        1,      2.5,     5,      10};

struct series {
    struct series *hash_next;   /* chain in the series table */
    struct series *family_next; /* insertion order within the family */
    struct family *family;
    char *labels;               /* "" when none */
    double value;               /* counter / gauge */
    /* histogram */
    double *bounds;
    uint64_t *bucket_counts; /* per bucket, not cumulative; [nbounds] is +Inf */
    size_t nbounds;
    double sum;
    uint64_t count;
};

struct family {
    struct family *hash_next;
    char *name;
    char *help;
    enum metric_type type;
    struct series *first, *last;
};

struct collector {
    metrics_collector_fn fn;
    void *ud;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;

static struct family **family_table;
static size_t family_buckets, family_count;
static struct series **series_table;
static size_t series_buckets, series_count;

static struct collector *collectors;
static size_t ncollectors, collectors_cap;

static uint64_t hash_str(uint64_t h, const char *s)
{
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

static uint64_t hash_family(const char *name)
{
    return hash_str(14695981039346656037ULL, name);
}

static uint64_t hash_series(const char *name, const char *labels)
{
    uint64_t h = hash_family(name);
    h ^= 0xff; /* separator so ("ab","c") and ("a","bc") differ */
    h *= 1099511628211ULL;
    return hash_str(h, labels);
}

static char *dup_or_die(const char *s)
{
    char *d = strdup(s ? s : "");
    if (!d) abort(); /* out of memory in the metrics registry: nothing sensible to do */
    return d;
}

static void *calloc_or_die(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p) abort();
    return p;
}

static void grow_families(void)
{
    size_t nb = family_buckets ? family_buckets * 2 : 64;
    struct family **nt = calloc_or_die(nb, sizeof *nt);
    for (size_t i = 0; i < family_buckets; i++) {
        struct family *f = family_table[i];
        while (f) {
            struct family *next = f->hash_next;
            size_t b = hash_family(f->name) % nb;
            f->hash_next = nt[b];
            nt[b] = f;
            f = next;
        }
    }
    free(family_table);
    family_table = nt;
    family_buckets = nb;
}

static struct family *find_family(const char *name)
{
    if (!family_buckets) return NULL;
    for (struct family *f = family_table[hash_family(name) % family_buckets]; f; f = f->hash_next)
        if (strcmp(f->name, name) == 0) return f;
    return NULL;
}

static struct family *get_family(const char *name, enum metric_type type)
{
    struct family *f = find_family(name);
    if (f) {
        if (f->type == MT_UNTYPED) f->type = type;
        return f;
    }
    if (family_count + 1 > family_buckets) grow_families();
    f = calloc_or_die(1, sizeof *f);
    f->name = dup_or_die(name);
    f->type = type;
    size_t b = hash_family(name) % family_buckets;
    f->hash_next = family_table[b];
    family_table[b] = f;
    family_count++;
    return f;
}

/* Series are keyed by (family, labels): the family's name is hashed, its pointer compared. */
static void grow_series(void)
{
    size_t nb = series_buckets ? series_buckets * 2 : 256;
    struct series **nt = calloc_or_die(nb, sizeof *nt);
    for (size_t i = 0; i < series_buckets; i++) {
        struct series *s = series_table[i];
        while (s) {
            struct series *next = s->hash_next;
            size_t b = hash_series(s->family->name, s->labels) % nb;
            s->hash_next = nt[b];
            nt[b] = s;
            s = next;
        }
    }
    free(series_table);
    series_table = nt;
    series_buckets = nb;
}

static struct series *get_series(struct family *f, const char *labels, const double *bounds,
                                 size_t nbounds)
{
    if (!labels) labels = "";
    if (series_buckets) {
        size_t b = hash_series(f->name, labels) % series_buckets;
        for (struct series *s = series_table[b]; s; s = s->hash_next)
            if (s->family == f && strcmp(s->labels, labels) == 0) return s;
    }
    if (series_count + 1 > series_buckets) grow_series();
    struct series *s = calloc_or_die(1, sizeof *s);
    s->family = f;
    s->labels = dup_or_die(labels);
    if (f->type == MT_HISTOGRAM) {
        if (!bounds || nbounds == 0) {
            bounds = default_bounds;
            nbounds = sizeof default_bounds / sizeof default_bounds[0];
        }
        s->bounds = calloc_or_die(nbounds, sizeof *s->bounds);
        memcpy(s->bounds, bounds, nbounds * sizeof *bounds);
        s->nbounds = nbounds;
        s->bucket_counts = calloc_or_die(nbounds + 1, sizeof *s->bucket_counts);
    }
    size_t b = hash_series(f->name, labels) % series_buckets;
    s->hash_next = series_table[b];
    series_table[b] = s;
    series_count++;
    if (f->last) f->last->family_next = s;
    else f->first = s;
    f->last = s;
    return s;
}

static enum metric_type parse_type(const char *type)
{
    if (!type) return MT_UNTYPED;
    for (int i = 0; i < 4; i++)
        if (strcmp(type, type_names[i]) == 0) return (enum metric_type)i;
    return MT_UNTYPED;
}

/* The series that carry no labels. Each is created at 0 when its module describes it (at
 * start), so a new process exposes them from its first scrape: an alert or a rate() on
 * ticketd_outbox_backlog must not see "no data" until the relay's first round. Series with
 * labels appear when a label value is first seen. test_metrics.py checks that every
 * label-less series of a busy process is in a fresh process's first scrape. */
static const char *const label_less[] = {
    "ticketd_consumer_db_unavailable_total", "ticketd_consumer_marks_batch_size",
    "ticketd_consumer_points_batch_size", "ticketd_consumer_processed_total",
    "ticketd_consumer_publish_to_processed_seconds", "ticketd_consumer_retries_total",
    "ticketd_dlq_produced_total", "ticketd_draining", "ticketd_group_commit_batch_size",
    "ticketd_group_commit_duration_seconds", "ticketd_group_commit_lookups_total",
    "ticketd_http_pending_requests", "ticketd_ingest_pending", "ticketd_outbox_backlog",
    "ticketd_outbox_oldest_unpublished_age_seconds", "ticketd_points_granted_total",
    "ticketd_relay_active", "ticketd_relay_commit_to_ack_seconds", "ticketd_relay_failures_total",
    "ticketd_relay_kafka_up", "ticketd_relay_published_total",
};

static int is_label_less(const char *name)
{
    for (size_t i = 0; i < sizeof label_less / sizeof label_less[0]; i++)
        if (strcmp(label_less[i], name) == 0) return 1;
    return 0;
}

void metrics_describe(const char *name, const char *type, const char *help)
{
    if (!name) return;
    pthread_mutex_lock(&registry_lock);
    struct family *f = get_family(name, parse_type(type));
    if (help && !f->help) f->help = dup_or_die(help);
    if (f->type != MT_UNTYPED && is_label_less(name)) get_series(f, NULL, NULL, 0);
    pthread_mutex_unlock(&registry_lock);
}

void metrics_counter_add(const char *name, const char *labels, double v)
{
    if (!name) return;
    pthread_mutex_lock(&registry_lock);
    struct family *f = get_family(name, MT_COUNTER);
    if (f->type == MT_COUNTER) get_series(f, labels, NULL, 0)->value += v;
    pthread_mutex_unlock(&registry_lock);
}

void metrics_gauge_set(const char *name, const char *labels, double v)
{
    if (!name) return;
    pthread_mutex_lock(&registry_lock);
    struct family *f = get_family(name, MT_GAUGE);
    if (f->type == MT_GAUGE) get_series(f, labels, NULL, 0)->value = v;
    pthread_mutex_unlock(&registry_lock);
}

void metrics_observe_buckets(const char *name, const char *labels, double v,
                             const double *bounds, size_t nbounds)
{
    if (!name) return;
    pthread_mutex_lock(&registry_lock);
    struct family *f = get_family(name, MT_HISTOGRAM);
    if (f->type == MT_HISTOGRAM) {
        struct series *s = get_series(f, labels, bounds, nbounds);
        /* A series created empty at describe has the default buckets: the first
         * observation's own bounds replace them. */
        if (s->count == 0 && bounds && nbounds &&
            (nbounds != s->nbounds || memcmp(bounds, s->bounds, nbounds * sizeof *bounds))) {
            free(s->bounds);
            free(s->bucket_counts);
            s->bounds = calloc_or_die(nbounds, sizeof *s->bounds);
            memcpy(s->bounds, bounds, nbounds * sizeof *bounds);
            s->nbounds = nbounds;
            s->bucket_counts = calloc_or_die(nbounds + 1, sizeof *s->bucket_counts);
        }
        size_t i = 0;
        while (i < s->nbounds && v > s->bounds[i]) i++;
        s->bucket_counts[i]++;
        s->sum += v;
        s->count++;
    }
    pthread_mutex_unlock(&registry_lock);
}

void metrics_observe(const char *name, const char *labels, double seconds)
{
    metrics_observe_buckets(name, labels, seconds, NULL, 0);
}

void metrics_add_collector(metrics_collector_fn fn, void *ud)
{
    if (!fn) return;
    pthread_mutex_lock(&registry_lock);
    if (ncollectors == collectors_cap) {
        size_t nc = collectors_cap ? collectors_cap * 2 : 8;
        struct collector *n = realloc(collectors, nc * sizeof *n);
        if (!n) abort();
        collectors = n;
        collectors_cap = nc;
    }
    collectors[ncollectors].fn = fn;
    collectors[ncollectors].ud = ud;
    ncollectors++;
    pthread_mutex_unlock(&registry_lock);
}

/* ---- rendering ---- */

/* Prometheus sample value: integers without exponent, others with enough precision. */
static void format_value(char *buf, size_t len, double v)
{
    if (isnan(v)) snprintf(buf, len, "NaN");
    else if (isinf(v)) snprintf(buf, len, v > 0 ? "+Inf" : "-Inf");
    else if (v == floor(v) && fabs(v) < 1e15) snprintf(buf, len, "%.0f", v);
    else snprintf(buf, len, "%.15g", v);
}

static void out_help(struct strbuf *o, const char *help)
{
    for (const char *p = help; *p; p++) {
        if (*p == '\\') strbuf_puts(o, "\\\\");
        else if (*p == '\n') strbuf_puts(o, "\\n");
        else strbuf_putc(o, *p);
    }
}

static int cmp_family(const void *a, const void *b)
{
    const struct family *fa = *(const struct family *const *)a;
    const struct family *fb = *(const struct family *const *)b;
    return strcmp(fa->name, fb->name);
}

static void render_histogram(struct strbuf *o, const struct family *f, const struct series *s)
{
    const char *sep = s->labels[0] ? "," : "";
    char num[64];
    uint64_t cumulative = 0;
    for (size_t i = 0; i <= s->nbounds; i++) {
        cumulative += s->bucket_counts[i];
        if (i < s->nbounds) format_value(num, sizeof num, s->bounds[i]);
        else snprintf(num, sizeof num, "+Inf");
        strbuf_printf(o, "%s_bucket{%s%sle=\"%s\"} %llu\n", f->name, s->labels, sep, num,
                   (unsigned long long)cumulative);
    }
    format_value(num, sizeof num, s->sum);
    if (s->labels[0]) {
        strbuf_printf(o, "%s_sum{%s} %s\n", f->name, s->labels, num);
        strbuf_printf(o, "%s_count{%s} %llu\n", f->name, s->labels, (unsigned long long)s->count);
    } else {
        strbuf_printf(o, "%s_sum %s\n", f->name, num);
        strbuf_printf(o, "%s_count %llu\n", f->name, (unsigned long long)s->count);
    }
}

char *metrics_render(size_t *len)
{
    /* Collectors set gauges themselves, so they run before the registry lock is taken.
     * Copy the list first: a collector may (in theory) add another collector. */
    pthread_mutex_lock(&registry_lock);
    size_t nc = ncollectors;
    struct collector *snapshot = calloc_or_die(nc, sizeof *snapshot);
    if (nc) memcpy(snapshot, collectors, nc * sizeof *snapshot);
    pthread_mutex_unlock(&registry_lock);
    for (size_t i = 0; i < nc; i++) snapshot[i].fn(snapshot[i].ud);
    free(snapshot);

    struct strbuf o = STRBUF_INIT;
    if (strbuf_reserve(&o, 4096) != 0) abort();

    pthread_mutex_lock(&registry_lock);
    struct family **sorted = calloc_or_die(family_count, sizeof *sorted);
    size_t n = 0;
    for (size_t b = 0; b < family_buckets; b++)
        for (struct family *f = family_table[b]; f; f = f->hash_next) sorted[n++] = f;
    qsort(sorted, n, sizeof *sorted, cmp_family);

    for (size_t i = 0; i < n; i++) {
        struct family *f = sorted[i];
        if (!f->first) continue; /* described but never recorded */
        if (f->help) {
            strbuf_printf(&o, "# HELP %s ", f->name);
            out_help(&o, f->help);
            strbuf_printf(&o, "\n");
        }
        strbuf_printf(&o, "# TYPE %s %s\n", f->name, type_names[f->type]);
        for (struct series *s = f->first; s; s = s->family_next) {
            if (f->type == MT_HISTOGRAM) {
                render_histogram(&o, f, s);
                continue;
            }
            char num[64];
            format_value(num, sizeof num, s->value);
            if (s->labels[0]) strbuf_printf(&o, "%s{%s} %s\n", f->name, s->labels, num);
            else strbuf_printf(&o, "%s %s\n", f->name, num);
        }
    }
    free(sorted);
    pthread_mutex_unlock(&registry_lock);

    if (o.failed) abort(); /* out of memory, or 64 MiB of series: as calloc_or_die */
    if (len) *len = o.len;
    return strbuf_take(&o);
}

void metrics_reset(void)
{
    pthread_mutex_lock(&registry_lock);
    for (size_t b = 0; b < series_buckets; b++) {
        struct series *s = series_table[b];
        while (s) {
            struct series *next = s->hash_next;
            free(s->labels);
            free(s->bounds);
            free(s->bucket_counts);
            free(s);
            s = next;
        }
    }
    free(series_table);
    series_table = NULL;
    series_buckets = series_count = 0;
    for (size_t b = 0; b < family_buckets; b++) {
        struct family *f = family_table[b];
        while (f) {
            struct family *next = f->hash_next;
            free(f->name);
            free(f->help);
            free(f);
            f = next;
        }
    }
    free(family_table);
    family_table = NULL;
    family_buckets = family_count = 0;
    free(collectors);
    collectors = NULL;
    ncollectors = collectors_cap = 0;
    pthread_mutex_unlock(&registry_lock);
}
