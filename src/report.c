/* report: the post-event report of one show (see report.h).
 *
 * Shape of a run (all blocking; CLI or thread pool): audit_run (its JSON report) -> one
 * REPEATABLE READ transaction for what the report adds (offset ranges, processed events,
 * follow-ups, dead letters, the applications the audit names, the timeline) -> the cluster
 * id -> the evidence section rendered into memory and hashed -> the document around it.
 * Memory stays bounded: the audit caps its lists, the report caps its own at
 * REPORT_LIST_MAX rows and REPORT_BUCKETS_MAX timeline buckets. */
#include "report.h"

#include <errno.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin_cli.h"
#include "admin_common.h"
#include "admin_kafka.h"
#include "admin_pg.h"
#include "audit.h"
#include "db_pool.h"
#include "limits.h"
#include "log.h"
#include "pg_array.h"
#include "validate.h"

#ifndef TICKETD_VERSION
#define TICKETD_VERSION "unknown"
#endif

#define EVIDENCE_BEGIN "<!-- evidence:begin -->\n"
#define EVIDENCE_END "\n<!-- evidence:end -->"

static const char *const effect_names[] = {"points", "data_platform", "email"};
#define NEFFECTS (sizeof effect_names / sizeof effect_names[0])

struct rep {
    const struct cfg *cfg;
    const char *event_id;
    char *err;
    size_t errlen;
    json_object *audit;      /* audit_run's report */
    PGconn *db;
    FILE *f;                 /* the evidence section being written */
};

/* ------------------------------------------------------------------ small helpers */

/* HTML text of s (also safe inside a double-quoted attribute). */
static void esc(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\'': fputs("&#39;", f); break;
        default:
            if ((unsigned char)*s < 0x20 && *s != '\n' && *s != '\t') fputc('?', f);
            else fputc(*s, f);
        }
    }
}

/* At most max bytes of s, cut before a UTF-8 continuation byte, with "..." when cut. */
static void esc_cut(FILE *f, const char *s, size_t max)
{
    if (!s) return;
    size_t n = strlen(s);
    if (n <= max) {
        esc(f, s);
        return;
    }
    while (max > 0 && ((unsigned char)s[max] & 0xC0) == 0x80) max--;
    char *c = strndup(s, max);
    esc(f, c ? c : "");
    free(c);
    fputs("...", f);
}

static void escf(FILE *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void escf(FILE *f, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    esc(f, buf);
}

/* The member at a dotted path of the audit report ("stages.outbox_kafka.verified"). */
static json_object *jget(json_object *o, const char *path)
{
    char key[96];
    while (o && *path) {
        size_t n = strcspn(path, ".");
        if (n >= sizeof key) return NULL;
        memcpy(key, path, n);
        key[n] = '\0';
        if (!json_object_object_get_ex(o, key, &o)) return NULL;
        path += n + (path[n] == '.');
    }
    return o;
}

static int64_t jint(json_object *o, const char *path)
{
    return json_object_get_int64(jget(o, path));
}

static const char *val(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : PQgetvalue(r, row, col);
}

static int64_t ival(const PGresult *r, int row, int col)
{
    return admin_pg_i64(val(r, row, col), 0);
}

static void masked(FILE *f, const char *phone)
{
    char m[32];
    log_mask_phone(phone ? phone : "", m, sizeof m);
    esc(f, phone ? m : "-");
}

/* One row of the counts table: label, number (data-key for tests and tools), its source. */
static void count_row(FILE *f, const char *key, const char *label, int64_t n, const char *source)
{
    fprintf(f, "<tr><th>%s</th><td class=\"n\" data-key=\"%s\">%" PRId64 "</td><td class=\"src\">",
            label, key, n);
    esc(f, source);
    fputs("</td></tr>\n", f);
}

static PGresult *q(struct rep *r, const char *sql, int n, const char *const *params)
{
    return admin_pg_exec(r->db, sql, n, params, r->err, r->errlen);
}

/* ------------------------------------------------------------------ the verdict */

static void sec_verdict(struct rep *r)
{
    FILE *f = r->f;
    int64_t n = jint(r->audit, "applications"), missing = jint(r->audit, "missing");
    int64_t in_flight = jint(r->audit, "stages.outbox_kafka.in_grace") +
                        jint(r->audit, "stages.kafka_consumer.pending");
    fprintf(f, "<section id=\"verdict\" class=\"%s\">\n<p id=\"verdict-sentence\">",
            missing ? "loss" : "ok");
    if (missing) {
        escf(f, "LOSSES: %" PRId64 " of the %" PRId64 " applications accepted for %s are not "
             "where they should be; each one is listed below under \"Applications not where "
             "they should be\".", missing, n, r->event_id);
    } else if (n == 0) {
        escf(f, "No application was accepted for %s.", r->event_id);
    } else if (in_flight) {
        escf(f, "Nothing is missing: all %" PRId64 " applications accepted for %s are accounted "
             "for, %" PRId64 " of them still on their way (within the grace window or not yet "
             "consumed).", n, r->event_id, in_flight);
    } else {
        escf(f, "Not one application was lost: all %" PRId64 " applications accepted for %s "
             "are in the outbox, in the topic at their recorded offsets, and processed with "
             "every follow-up done.", n, r->event_id);
    }
    fprintf(f, "</p>\n<p class=\"sub\">Audit verdict: <b data-key=\"verdict\">%s</b>, "
            "<span data-key=\"missing\">%" PRId64 "</span> missing.</p>\n</section>\n",
            missing ? "incomplete" : "complete", missing);
}

/* ------------------------------------------------------------------ the counts */

static int sec_counts(struct rep *r, const char *const *p1)
{
    FILE *f = r->f;
    PGresult *res = q(r,
                      "SELECT count(*) FROM processed_events pe JOIN outbox o"
                      " ON o.event_id = pe.event_id WHERE o.payload->>'event_id' = $1",
                      1, p1);
    if (!res) return -1;
    int64_t processed_rows = ival(res, 0, 0);
    PQclear(res);

    char src[512];
    const char *e = r->event_id;
    fputs("<section id=\"evidence\">\n<h2>Evidence</h2>\n"
          "<table class=\"counts\">\n<tr><th>what</th><th>number</th><th>source</th></tr>\n", f);
    snprintf(src, sizeof src, "audit stage 1: SELECT count(*) FROM applications WHERE event_id = '%s'", e);
    count_row(f, "applications", "Applications accepted", jint(r->audit, "applications"), src);
    fputs("<tr><th>Duplicates refused (409)</th><td class=\"n\" data-key=\"duplicates\">not "
          "recorded</td><td class=\"src\">ticketd keeps no durable record of a refused "
          "duplicate: the UNIQUE (event_id, phone) constraint refuses it and nothing is written. "
          "The only count is the process-lifetime counter "
          "ticketd_ingest_applications_total{result=&quot;duplicate&quot;} (GET /metrics; all "
          "shows together, reset at every restart, not durable).</td></tr>\n", f);
    fputs("<tr><th>Invalid requests refused (400/422)</th><td class=\"n\" "
          "data-key=\"invalid\">not recorded</td><td class=\"src\">refused before the database; "
          "nothing is written. The only count is "
          "ticketd_http_requests_total{route=&quot;apply&quot;,code=&quot;400&quot;|&quot;422&quot;} "
          "(GET /metrics; all shows, reset at every restart, not durable).</td></tr>\n", f);
    snprintf(src, sizeof src, "audit stage 1: SELECT count(*) FROM outbox WHERE payload->>'event_id' = '%s'", e);
    count_row(f, "outbox_rows", "Outbox rows", jint(r->audit, "stages.applications_outbox.outbox_rows"), src);
    count_row(f, "outbox_pruned", "Outbox rows pruned after OUTBOX_RETENTION",
              jint(r->audit, "stages.applications_outbox.outbox_pruned"),
              "audit stage 1: applications older than OUTBOX_RETENTION without their row");
    snprintf(src, sizeof src, "audit stage 2: outbox rows of '%s' with a publication record", e);
    count_row(f, "published", "Outbox rows published", jint(r->audit, "stages.outbox_kafka.published"), src);
    snprintf(src, sizeof src, "audit stage 2: read %s from each partition's low to high watermark; "
             "the message at the row's (kafka_partition, kafka_offset) carries its ce_id",
             r->cfg->topic);
    count_row(f, "verified", "Messages in the topic at their recorded offset",
              jint(r->audit, "stages.outbox_kafka.verified"), src);
    count_row(f, "in_grace", "Unpublished, within the grace window",
              jint(r->audit, "stages.outbox_kafka.in_grace"),
              "audit stage 2: unpublished rows younger than AUDIT_GRACE");
    snprintf(src, sizeof src, "SELECT count(*) FROM processed_events JOIN outbox USING (event_id) "
             "WHERE payload->>'event_id' = '%s'", e);
    count_row(f, "processed_events", "Events processed (processed_events rows)", processed_rows, src);
    snprintf(src, sizeof src, "audit stage 3: below the committed offset of group %s, processed "
             "and every event_effects row done", r->cfg->consumer_group);
    count_row(f, "processed_done", "Events processed, every follow-up done",
              jint(r->audit, "stages.kafka_consumer.processed"), src);
    count_row(f, "pending", "Events at or above the committed offset (not yet consumed)",
              jint(r->audit, "stages.kafka_consumer.pending"),
              "audit stage 3: committed offsets read with the group id, never joining the group");
    fputs("</table>\n", f);
    return 0;
}

/* ------------------------------------------------------------------ partitions */

/* How many of the audit's items (each with "partition") are in partition p. */
static int64_t in_partition(json_object *items, int64_t p)
{
    int64_t n = 0;
    for (size_t k = 0; k < json_object_array_length(items); k++)
        n += jint(json_object_array_get_idx(items, k), "partition") == p;
    return n;
}

static int sec_partitions(struct rep *r, const char *const *p1)
{
    FILE *f = r->f;
    PGresult *res = q(r,
                      "SELECT o.kafka_partition, count(*), min(o.kafka_offset), max(o.kafka_offset)"
                      " FROM outbox_status o WHERE o.payload->>'event_id' = $1 AND o.published_at IS NOT NULL"
                      " AND o.kafka_partition IS NOT NULL GROUP BY 1 ORDER BY 1",
                      1, p1);
    if (!res) return -1;
    json_object *parts = jget(r->audit, "stages.kafka_consumer.partitions");
    json_object *orphans = jget(r->audit, "stages.outbox_kafka.topic_without_row.items");
    json_object *copies = jget(r->audit, "stages.outbox_kafka.recorded_elsewhere.items");
    fputs("<h3>Messages of this show in the topic ", f);
    esc(f, r->cfg->topic);
    fputs(", per partition</h3>\n<table class=\"parts\">\n<tr><th>partition</th><th>messages "
          "(published rows)</th><th>their offsets</th><th>verified at their offset</th><th>copies "
          "re-sent (replays)</th><th>messages with no outbox row</th></tr>\n", f);
    int row = 0, nrows = PQntuples(res);
    for (size_t i = 0; i < json_object_array_length(parts); i++) {
        json_object *pj = json_object_array_get_idx(parts, i);
        int64_t p = jint(pj, "partition"), cnt = 0;
        const char *lo = NULL, *hi = NULL;
        while (row < nrows && ival(res, row, 0) < p) row++;
        if (row < nrows && ival(res, row, 0) == p) {
            cnt = ival(res, row, 1);
            lo = val(res, row, 2);
            hi = val(res, row, 3);
        }
        fprintf(f, "<tr><td>%" PRId64 "</td><td class=\"n\" data-key=\"p%" PRId64 "_messages\">%"
                PRId64 "</td><td data-key=\"p%" PRId64 "_range\">", p, p, cnt, p);
        if (lo && hi) fprintf(f, "%s..%s", lo, hi);
        else fputs("-", f);
        fprintf(f, "</td><td class=\"n\" data-key=\"p%" PRId64 "_verified\">%" PRId64
                "</td><td class=\"n\" data-key=\"p%" PRId64 "_copies\">%" PRId64 "</td><td "
                "class=\"n\" data-key=\"p%" PRId64 "_orphans\">%" PRId64 "</td></tr>\n",
                p, jint(pj, "verified"), p, in_partition(copies, p), p, in_partition(orphans, p));
    }
    PQclear(res);
    fputs("</table>\n<p class=\"src\">Messages and offsets: SELECT kafka_partition, count(*), "
          "min(kafka_offset), max(kafka_offset) FROM outbox_status WHERE payload-&gt;&gt;'event_id' = '", f);
    esc(f, r->event_id);
    fputs("' AND published_at IS NOT NULL GROUP BY 1. Verified, copies re-sent and messages with "
          "no row: the audit, stage 2 (recorded_elsewhere and topic_without_row, listed up to its "
          "cap).</p>\n", f);
    return 0;
}

/* The topic and the group as a whole (other shows move them): outside the evidence, so the
 * evidence's hash depends on this show's data only. */
static void cluster_state(const struct rep *r, FILE *f)
{
    json_object *parts = jget(r->audit, "stages.kafka_consumer.partitions");
    fputs("<section id=\"cluster-state\">\n<h2>The topic and the consumer group when the report "
          "was made</h2>\n<table class=\"parts\">\n<tr><th>partition</th><th>low..high watermark"
          "</th><th>committed offset</th><th>lag</th></tr>\n", f);
    for (size_t i = 0; i < json_object_array_length(parts); i++) {
        json_object *pj = json_object_array_get_idx(parts, i), *c = jget(pj, "committed");
        int64_t p = jint(pj, "partition");
        fprintf(f, "<tr><td>%" PRId64 "</td><td>%" PRId64 "..%" PRId64 "</td><td data-key=\"p%"
                PRId64 "_committed\">", p, jint(pj, "low"), jint(pj, "high"), p);
        if (c) fprintf(f, "%" PRId64, json_object_get_int64(c));
        else fputs("none", f);
        fprintf(f, "</td><td>%" PRId64 "</td></tr>\n", jint(pj, "lag"));
    }
    fprintf(f, "</table>\n<p>Consumer lag, all shows: <span data-key=\"lag\">%" PRId64
            "</span> messages.</p>\n<p class=\"src\">The audit, stage 3: watermarks of ",
            jint(r->audit, "stages.kafka_consumer.lag"));
    esc(f, r->cfg->topic);
    fputs(", the committed offsets of group ", f);
    esc(f, r->cfg->consumer_group);
    fputs(" (read with its group id, never joining it); lag = high watermark - committed. Every "
          "show shares them, so they stand outside the evidence section.</p>\n</section>\n", f);
}

/* ------------------------------------------------------------------ follow-ups */

static int sec_followups(struct rep *r, const char *const *p1)
{
    FILE *f = r->f;
    PGresult *res = q(r,
                      "WITH dl AS (SELECT event_id, bool_or(replayed_at IS NULL) AS open,"
                      "  bool_or(replayed_at IS NOT NULL) AS replayed FROM dead_letters GROUP BY 1)"
                      " SELECT e.effect, count(*), count(*) FILTER (WHERE e.done),"
                      "  count(*) FILTER (WHERE e.done AND coalesce(dl.replayed, false)),"
                      "  count(*) FILTER (WHERE NOT e.done AND coalesce(dl.open, false)),"
                      "  count(*) FILTER (WHERE NOT e.done AND NOT coalesce(dl.open, false))"
                      " FROM event_effects e JOIN outbox o ON o.event_id = e.event_id"
                      " LEFT JOIN dl ON dl.event_id = e.event_id"
                      " WHERE o.payload->>'event_id' = $1 GROUP BY 1 ORDER BY 1",
                      1, p1);
    if (!res) return -1;
    fputs("<h3>Follow-ups</h3>\n<table class=\"effects\">\n<tr><th>follow-up</th><th>rows</th>"
          "<th>delivered</th><th>of which after a replay</th><th>dead-lettered (not replayed)</th>"
          "<th>still open</th></tr>\n", f);
    for (size_t k = 0; k < NEFFECTS; k++) {
        int64_t v[5] = {0};
        for (int i = 0; i < PQntuples(res); i++)
            if (strcmp(PQgetvalue(res, i, 0), effect_names[k]) == 0)
                for (int c = 0; c < 5; c++) v[c] = ival(res, i, c + 1);
        static const char *const cols[5] = {"rows", "delivered", "replayed", "dead_lettered", "open"};
        fprintf(f, "<tr><th>%s</th>", effect_names[k]);
        for (int c = 0; c < 5; c++)
            fprintf(f, "<td class=\"n\" data-key=\"%s_%s\">%" PRId64 "</td>", effect_names[k],
                    cols[c], v[c]);
        fputs("</tr>\n", f);
    }
    PQclear(res);
    fputs("</table>\n<p class=\"src\">SELECT effect, count(*) ... FROM event_effects JOIN outbox "
          "USING (event_id) LEFT JOIN dead_letters (per event: any not replayed = dead-lettered; "
          "any replayed = replayed) WHERE payload-&gt;&gt;'event_id' = '", f);
    esc(f, r->event_id);
    fputs("' GROUP BY effect. A follow-up that is not configured (DATA_PLATFORM_URL, SMTP_URL, "
          "no e-mail address) has no rows.</p>\n", f);
    return 0;
}

/* ------------------------------------------------------------------ the audit's categories */

static void sec_reconciliation(struct rep *r)
{
    FILE *f = r->f;
    static const char *const stages[][2] = {
        {"applications_outbox", "1: applications - outbox"},
        {"outbox_kafka", "2: outbox - topic"},
        {"kafka_consumer", "3: topic - consumer - DLQ"},
    };
    fputs("<h3>Reconciliation, finding by finding</h3>\n<table class=\"recon\">\n<tr><th>stage"
          "</th><th>finding</th><th>count</th></tr>\n", f);
    for (size_t s = 0; s < sizeof stages / sizeof stages[0]; s++) {
        json_object *st = jget(jget(r->audit, "stages"), stages[s][0]);
        if (!st) continue;
        json_object_object_foreach(st, key, v) {
            json_object *cnt = NULL;
            if (!json_object_is_type(v, json_type_object) ||
                !json_object_object_get_ex(v, "count", &cnt))
                continue;
            int64_t n = json_object_get_int64(cnt);
            fprintf(f, "<tr%s><td>%s</td><td>", n ? " class=\"hit\"" : "", stages[s][1]);
            for (const char *c = key; *c; c++) fputc(*c == '_' ? ' ' : *c, f);
            fprintf(f, "</td><td class=\"n\" data-key=\"audit_%s\">%" PRId64 "</td></tr>\n", key, n);
        }
    }
    fputs("</table>\n<p class=\"src\">ticketd audit --event-id ", f);
    esc(f, r->event_id);
    fputs(" --json (the same reconciliation, the same snapshot).</p>\n</section>\n", f);
}

/* ------------------------------------------------------------------ the timeline */

struct series {
    const char *name;
    const char *color;
    const int64_t *v;
};

/* A line chart of nb buckets; x in seconds since the opening's first application. */
static void svg_chart(FILE *f, const char *id, const char *title, const struct series *s, int ns,
                      int nb, int width_s)
{
    const double W = 860, H = 210, L = 60, R = 12, T = 26, B = 30;
    int64_t ymax = 1;
#define X(i) (nb > 1 ? L + (W - L - R) * (i) / (nb - 1) : L + (W - L - R) / 2)
#define Y(v) (T + (H - T - B) * (1.0 - (double)(v) / (double)ymax))
    for (int k = 0; k < ns; k++)
        for (int i = 0; i < nb; i++)
            if (s[k].v[i] > ymax) ymax = s[k].v[i];
    fprintf(f, "<svg id=\"%s\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 %.0f %.0f\" "
            "role=\"img\"><title>%s</title>\n", id, W, H, title);
    fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"#fff\" "
            "stroke=\"#999\"/>\n", L, T, W - L - R, H - T - B);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\">%" PRId64 "</text>"
            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\">0</text>\n",
            L - 4, T + 10, ymax, L - 4, H - B);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\">+0 s</text><text x=\"%.0f\" y=\"%.0f\" "
            "text-anchor=\"end\">+%d s</text>\n", L, H - B + 16, W - R, H - B + 16,
            (nb - 1) * width_s);
    double lx = L;
    for (int k = 0; k < ns; k++) {
        fprintf(f, "<text x=\"%.0f\" y=\"16\" fill=\"%s\">&#9632; %s</text>\n", lx, s[k].color,
                s[k].name);
        lx += 8.0 * (double)strlen(s[k].name) + 40;
        int64_t total = 0;
        for (int i = 0; i < nb; i++) total += s[k].v[i];
        fprintf(f, "<polyline data-series=\"%s\" data-sum=\"%" PRId64 "\" fill=\"none\" "
                "stroke=\"%s\" stroke-width=\"1.5\" points=\"", s[k].name, total, s[k].color);
        for (int i = 0; i < nb; i++) fprintf(f, "%s%.1f,%.1f", i ? " " : "", X(i), Y(s[k].v[i]));
        fputs("\"/>\n", f);
        for (int i = 0; i < nb && nb <= REPORT_SVG_MARKERS_MAX; i++)
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", X(i),
                    Y(s[k].v[i]), s[k].color);
    }
    fputs("</svg>\n", f);
#undef X
#undef Y
}

/* Bucket k of each series from a (series, bucket, count) result. */
static void fill_buckets(const PGresult *res, int64_t *acc, int64_t *pub, int64_t *proc, int nb)
{
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t k = ival(res, i, 1);
        if (k < 0) k = 0;
        if (k >= nb) k = nb - 1;
        int64_t *v = PQgetvalue(res, i, 0)[0] == 'a' ? acc : PQgetvalue(res, i, 0)[0] == 'o' ? pub : proc;
        v[k] += ival(res, i, 2);
    }
}

static int sec_timeline(struct rep *r, const char *const *p1)
{
    FILE *f = r->f;
    /* The window: the first application to the last of accepted, published, processed. */
    PGresult *res = q(r,
                      "WITH o AS (SELECT event_id, published_at FROM outbox_status"
                      "  WHERE payload->>'event_id' = $1),"
                      " t AS (SELECT min(created_at) t0, max(created_at) t1 FROM applications"
                      "  WHERE event_id = $1)"
                      " SELECT " DBP_RFC3339_UTC("t.t0") ","
                      "  extract(epoch FROM greatest(t.t1, (SELECT max(published_at) FROM o),"
                      "   (SELECT max(pe.processed_at) FROM processed_events pe JOIN o USING (event_id)))"
                      "   - t.t0)"
                      " FROM t WHERE t.t0 IS NOT NULL",
                      1, p1);
    if (!res) return -1;
    fputs("<section id=\"timeline\">\n<h2>Timeline</h2>\n", f);
    if (PQntuples(res) == 0) {
        PQclear(res);
        fputs("<p>No application, no timeline.</p>\n</section>\n", f);
        return 0;
    }
    char t0[64];
    snprintf(t0, sizeof t0, "%s", PQgetvalue(res, 0, 0));
    double span = strtod(PQgetvalue(res, 0, 1), NULL);
    PQclear(res);
    int width = 1;
    while (span / width >= REPORT_BUCKETS_MAX) width *= 2;
    int nb = (int)(span / width) + 1;

    char wtxt[16];
    snprintf(wtxt, sizeof wtxt, "%d", width);
    const char *p2[2] = {p1[0], wtxt};
    res = q(r,
            "WITH t AS (SELECT min(created_at) t0 FROM applications WHERE event_id = $1),"
            " o AS (SELECT event_id, published_at FROM outbox_status WHERE payload->>'event_id' = $1)"
            " SELECT 'a', floor(extract(epoch FROM a.created_at - t.t0) / $2::int)::bigint k, count(*)"
            "  FROM applications a, t WHERE a.event_id = $1 GROUP BY 2"
            " UNION ALL SELECT 'o', floor(extract(epoch FROM o.published_at - t.t0) / $2::int)::bigint,"
            "  count(*) FROM o, t WHERE o.published_at IS NOT NULL GROUP BY 2"
            " UNION ALL SELECT 'p', floor(extract(epoch FROM pe.processed_at - t.t0) / $2::int)::bigint,"
            "  count(*) FROM processed_events pe JOIN o USING (event_id), t GROUP BY 2"
            " ORDER BY 1, 2",
            2, p2);
    if (!res) return -1;
    int64_t *v = calloc((size_t)nb * 5, sizeof *v);
    if (!v) {
        PQclear(res);
        admin_set_err(r->err, r->errlen, "out of memory");
        return -1;
    }
    int64_t *acc = v, *pub = v + nb, *proc = v + 2 * nb, *backlog = v + 3 * nb, *lag = v + 4 * nb;
    fill_buckets(res, acc, pub, proc, nb);
    PQclear(res);
    int64_t ca = 0, cp = 0, cq = 0;
    for (int i = 0; i < nb; i++) {
        ca += acc[i];
        cp += pub[i];
        cq += proc[i];
        backlog[i] = ca - cp;
        lag[i] = cp - cq > 0 ? cp - cq : 0;
    }
    fputs("<p>From ", f);
    esc(f, t0);
    fprintf(f, " (the first application), %d s per point.</p>\n", width);
    char title[64];
    snprintf(title, sizeof title, "per %d s: accepted, published, processed", width);
    const struct series rates[3] = {{"accepted", "#1f77b4", acc},
                                    {"published", "#ff7f0e", pub},
                                    {"processed", "#2ca02c", proc}};
    svg_chart(f, "chart-rates", title, rates, 3, nb, width);
    const struct series queues[2] = {{"backlog (accepted, not published)", "#d62728", backlog},
                                     {"lag (published, not processed)", "#9467bd", lag}};
    svg_chart(f, "chart-backlog", "backlog and lag at the end of each point", queues, 2, nb, width);
    free(v);
    fputs("<p class=\"src\">applications.created_at, outbox_publications.published_at and "
          "processed_events.processed_at of this show, counted per point; backlog and lag are "
          "their running differences.</p>\n</section>\n", f);
    return 0;
}

/* ------------------------------------------------------------------ dead letters */

static int sec_dead_letters(struct rep *r, const char *const *p1)
{
    FILE *f = r->f;
    static const char *const filter =
        " FROM dead_letters d LEFT JOIN outbox o ON o.event_id = d.event_id"
        " LEFT JOIN applications a ON a.id = d.application_id"
        " WHERE (o.payload->>'event_id' = $1 OR a.event_id = $1)";
    char sql[1536];
    snprintf(sql, sizeof sql, "SELECT count(*)%s", filter);
    PGresult *res = q(r, sql, 1, p1);
    if (!res) return -1;
    int64_t total = ival(res, 0, 0);
    PQclear(res);
    snprintf(sql, sizeof sql,
             "SELECT d.id, d.event_id::text, d.application_id, to_jsonb(a)->>'reference', a.phone,"
             " d.src_partition, d.src_offset, d.attempts, d.error_class, d.error_message,"
             " " DBP_RFC3339_UTC("d.dead_lettered_at") ", " DBP_RFC3339_UTC("d.replayed_at") ","
             " EXISTS (SELECT 1 FROM processed_events pe WHERE pe.event_id = d.event_id),"
             " (SELECT count(*) FROM event_effects e WHERE e.event_id = d.event_id AND NOT e.done)"
             "%s ORDER BY d.id LIMIT %d",
             filter, REPORT_LIST_MAX);
    if (!(res = q(r, sql, 1, p1))) return -1;
    fprintf(f, "<section id=\"dead-letters\">\n<h2>Dead letters: <span data-key=\"dead_letters\">"
            "%" PRId64 "</span></h2>\n", total);
    if (total == 0) {
        fputs("<p>None.</p>\n", f);
    } else {
        fputs("<table class=\"dlq\">\n<tr><th>#</th><th>application</th><th>phone</th><th>event "
              "(ce_id)</th><th>from</th><th>error class</th><th>attempts</th><th>dead-lettered"
              "</th><th>replayed</th><th>outcome</th></tr>\n", f);
    }
    for (int i = 0; i < PQntuples(res); i++) {
        const char *replayed = val(res, i, 11);
        bool processed = val(res, i, 12)[0] == 't';
        int64_t open = ival(res, i, 13);
        const char *outcome = !replayed && processed && open == 0
                                  ? "not replayed; the event was processed all the same"
                              : !replayed ? "open: in the DLQ, not replayed"
                              : processed && open == 0 ? "delivered after the replay"
                              : processed ? "replayed, follow-ups still open"
                                          : "replayed, not processed yet";
        fprintf(f, "<tr class=\"%s\"><td>%s</td><td>", replayed ? "replayed" : "open",
                PQgetvalue(res, i, 0));
        esc(f, val(res, i, 2) ? val(res, i, 2) : "-");
        if (val(res, i, 3)) {
            fputs("<br><small>", f);
            esc(f, val(res, i, 3));
            fputs("</small>", f);
        }
        fputs("</td><td>", f);
        masked(f, val(res, i, 4));
        fputs("</td><td><small>", f);
        esc(f, val(res, i, 1));
        fprintf(f, "</small></td><td>%s@%s</td><td>", PQgetvalue(res, i, 5), PQgetvalue(res, i, 6));
        esc(f, val(res, i, 8));
        fputs("<br><small>", f);
        esc_cut(f, val(res, i, 9), REPORT_ERROR_TEXT_MAX);
        fprintf(f, "</small></td><td>%s</td><td>", PQgetvalue(res, i, 7));
        esc(f, val(res, i, 10));
        fputs("</td><td>", f);
        esc(f, replayed ? replayed : "-");
        fprintf(f, "</td><td class=\"outcome\">%s</td></tr>\n", outcome);
    }
    if (total) fputs("</table>\n", f);
    if (total > PQntuples(res))
        fprintf(f, "<p>... and %" PRId64 " more (GET /admin/dlq lists them all).</p>\n",
                total - PQntuples(res));
    PQclear(res);
    fputs("<p class=\"src\">dead_letters of this show (by its outbox row or its application), "
          "with processed_events and event_effects for the outcome.</p>\n</section>\n", f);
    return 0;
}

/* ------------------------------------------------------------------ what is missing */

struct lost {
    int64_t id;
    bool known;              /* a row of applications has this id */
    char reference[40];
    char phone[32];          /* masked */
    char created[40];
    char where[768];         /* the audit's findings about it */
};

static int cmp_lost(const void *x, const void *y)
{
    int64_t a = ((const struct lost *)x)->id, b = ((const struct lost *)y)->id;
    return a < b ? -1 : a > b;
}

/* Appends the detail of every audit finding naming an application in lost[]. */
static void collect_findings(json_object *audit, struct lost *lost, size_t n)
{
    json_object *stages = jget(audit, "stages");
    if (!json_object_is_type(stages, json_type_object)) return;
    json_object_object_foreach(stages, sk, st) {
        (void)sk;
        if (!json_object_is_type(st, json_type_object)) continue;
        json_object_object_foreach(st, ck, cat) {
            (void)ck;
            json_object *items = NULL;
            if (!json_object_is_type(cat, json_type_object) ||
                !json_object_object_get_ex(cat, "items", &items))
                continue;
            for (size_t i = 0; i < json_object_array_length(items); i++) {
                json_object *it = json_object_array_get_idx(items, i), *id = NULL, *d = NULL;
                if (!json_object_object_get_ex(it, "application_id", &id)) continue;
                struct lost key = {.id = json_object_get_int64(id)};
                struct lost *l = bsearch(&key, lost, n, sizeof *lost, cmp_lost);
                if (!l || !json_object_object_get_ex(it, "detail", &d)) continue;
                size_t used = strlen(l->where);
                snprintf(l->where + used, sizeof l->where - used, "%s%s", used ? "; " : "",
                         json_object_get_string(d));
            }
        }
    }
}

static int sec_missing(struct rep *r)
{
    FILE *f = r->f;
    json_object *ids = jget(r->audit, "missing_ids");
    size_t nids = json_object_array_length(ids), n = 0;
    int64_t missing = jint(r->audit, "missing");
    fprintf(f, "<section id=\"missing\">\n<h2>Applications not where they should be: "
            "<span data-key=\"missing_listed\">%" PRId64 "</span></h2>\n", missing);
    if (missing == 0) {
        fputs("<p>None.</p>\n</section>\n", f);
        return 0;
    }
    struct lost *lost = calloc(nids ? nids : 1, sizeof *lost);
    if (!lost) {
        admin_set_err(r->err, r->errlen, "out of memory");
        return -1;
    }
    struct strbuf arr;
    strbuf_init(&arr, 0);
    pg_array_open(&arr);
    json_object *unknown = json_object_new_array(); /* ids that are not numbers ("?", keys) */
    for (size_t i = 0; i < nids; i++) {
        json_object *id = json_object_array_get_idx(ids, i);
        if (!json_object_is_type(id, json_type_int)) {
            json_object_array_add(unknown, json_object_get(id));
            continue;
        }
        lost[n].id = json_object_get_int64(id);
        pg_array_int(&arr, lost[n].id);
        n++;
    }
    if (pg_array_close(&arr)) {
        strbuf_free(&arr);
        free(lost);
        json_object_put(unknown);
        admin_set_err(r->err, r->errlen, "out of memory");
        return -1;
    }
    qsort(lost, n, sizeof *lost, cmp_lost);
    const char *p1[1] = {strbuf_str(&arr)};
    PGresult *res = q(r,
                      "SELECT a.id, to_jsonb(a)->>'reference', a.phone, " DBP_RFC3339_UTC("a.created_at")
                      " FROM applications a WHERE a.id = ANY($1::bigint[])",
                      1, p1);
    strbuf_free(&arr);
    if (!res) {
        free(lost);
        json_object_put(unknown);
        return -1;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        struct lost key = {.id = ival(res, i, 0)};
        struct lost *l = bsearch(&key, lost, n, sizeof *lost, cmp_lost);
        if (!l) continue;
        l->known = true;
        snprintf(l->reference, sizeof l->reference, "%s", val(res, i, 1) ? val(res, i, 1) : "");
        log_mask_phone(PQgetvalue(res, i, 2), l->phone, sizeof l->phone);
        snprintf(l->created, sizeof l->created, "%s", PQgetvalue(res, i, 3));
    }
    PQclear(res);
    collect_findings(r->audit, lost, n);

    fputs("<table class=\"lost\">\n<tr><th>application</th><th>reference</th><th>phone</th>"
          "<th>accepted at</th><th>where it stopped (the audit's findings)</th></tr>\n", f);
    for (size_t i = 0; i < n; i++) {
        const struct lost *l = &lost[i];
        fprintf(f, "<tr data-application=\"%" PRId64 "\"><td>%" PRId64 "</td><td>", l->id, l->id);
        esc(f, l->reference[0] ? l->reference : "-");
        fputs("</td><td>", f);
        esc(f, l->known ? l->phone : "-");
        fputs("</td><td>", f);
        esc(f, l->known ? l->created : "no application row");
        fputs("</td><td>", f);
        esc(f, l->where[0] ? l->where : "-");
        fputs("</td></tr>\n", f);
    }
    for (size_t i = 0; i < json_object_array_length(unknown); i++) {
        fputs("<tr><td>", f);
        esc(f, json_object_get_string(json_object_array_get_idx(unknown, i)));
        fputs("</td><td>-</td><td>-</td><td>-</td><td>a message of the topic whose key is not "
              "an application id (see the reconciliation table)</td></tr>\n", f);
    }
    fputs("</table>\n", f);
    if (missing > (int64_t)nids)
        fprintf(f, "<p>... and %" PRId64 " more (ticketd audit --json lists up to %d).</p>\n",
                missing - (int64_t)nids, AUDIT_LIST_MAX);
    fputs("<p class=\"src\">The audit's missing_ids, looked up in applications (phones masked "
          "as in the logs; e-mail addresses are never shown).</p>\n</section>\n", f);
    free(lost);
    json_object_put(unknown);
    return 0;
}

/* ------------------------------------------------------------------ the document */

static const char *const style =
    "<style>\n"
    "@page{size:A4;margin:14mm}\n"
    "body{font:13px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;color:#111;margin:24px;"
    "max-width:1000px}\n"
    "h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:22px 0 6px;"
    "border-bottom:1px solid #ccc}h3{font-size:14px;margin:14px 0 4px}\n"
    "#verdict{padding:10px 14px;border-radius:4px;font-size:15px}\n"
    "#verdict.ok{background:#e6f4ea;border:1px solid #34a853}\n"
    "#verdict.loss{background:#fce8e6;border:2px solid #d93025}\n"
    "#verdict p{margin:4px 0}#verdict .sub{font-size:12px;color:#444}\n"
    "table{border-collapse:collapse;margin:4px 0 8px;width:100%}\n"
    "th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}\n"
    "th{background:#f3f3f3;font-weight:600}td.n{text-align:right;font-variant-numeric:"
    "tabular-nums;white-space:nowrap}\n"
    ".src,td.src{color:#555;font-size:11px}tr.hit td{background:#fff4e5}\n"
    "tr.open td.outcome{color:#d93025;font-weight:600}\n"
    "svg{width:100%;height:auto;font-size:11px;margin:4px 0}\n"
    "code{font-size:11px;word-break:break-all}\n"
    "tr,svg{page-break-inside:avoid;break-inside:avoid}\n"
    "@media print{body{margin:0}}\n"
    "</style>\n";

static int evidence(struct rep *r)
{
    const char *p1[1] = {r->event_id};
    sec_verdict(r);
    if (sec_counts(r, p1) || sec_partitions(r, p1) || sec_followups(r, p1)) return -1;
    sec_reconciliation(r);
    if (sec_timeline(r, p1) || sec_dead_letters(r, p1) || sec_missing(r)) return -1;
    return 0;
}

static void about(const struct rep *r, FILE *f, const char *brokers, const char *cluster_id,
                  const char *sha)
{
    char now[40];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    admin_format_ms((int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, now, sizeof now);
    char *db = cfg_redact_url(r->cfg->database_url ? r->cfg->database_url : "");
    fputs("<section id=\"about\">\n<h2>About this report</h2>\n<table class=\"about\">\n", f);
    fprintf(f, "<tr><th>made at</th><td data-key=\"generated_at\">%s</td></tr>\n", now);
    fputs("<tr><th>by</th><td data-key=\"version\">ticketd ", f);
    esc(f, TICKETD_VERSION);
    fputs("</td></tr>\n<tr><th>database</th><td data-key=\"database\">", f);
    esc(f, db ? db : "?");
    fputs("</td></tr>\n<tr><th>Kafka cluster</th><td data-key=\"cluster\">", f);
    esc(f, cluster_id ? cluster_id : "(cluster id unknown)");
    fputs(" at ", f);
    esc(f, brokers);
    fputs("; topic ", f);
    esc(f, r->cfg->topic);
    fputs(", DLQ ", f);
    esc(f, r->cfg->dlq_topic);
    fputs(", group ", f);
    esc(f, r->cfg->consumer_group);
    fprintf(f, "</td></tr>\n<tr><th>SHA-256 of the evidence section</th><td><code "
            "id=\"evidence-sha256\">%s</code><br><span class=\"src\">the bytes between the lines "
            "&lt;!-- evidence:begin --&gt; and &lt;!-- evidence:end --&gt; of this file; a later "
            "report on unchanged data shows the same value</span></td></tr>\n</table>\n"
            "</section>\n", sha);
    free(db);
}

static void sha256_hex(const char *data, size_t len, char out[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    out[0] = '\0';
    if (!EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL)) return;
    for (unsigned i = 0; i < mdlen && i < 32; i++) sprintf(out + 2 * i, "%02x", md[i]);
}

int report_run(const struct cfg *cfg, const char *brokers, const char *event_id,
               struct report_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof *res);
    if (!event_id || !validate_event_id(event_id, strlen(event_id))) {
        admin_set_err(err, errlen, "an event id is required (1-64 characters of [A-Za-z0-9._-])");
        return -2;
    }
    struct rep r = {.cfg = cfg, .event_id = event_id, .err = err, .errlen = errlen};
    struct audit_opts ao = {.event_id = event_id};
    char *evbuf = NULL, *cluster = NULL;
    size_t evlen = 0;
    rd_kafka_t *rk = NULL;
    int ret = audit_run(cfg, brokers, &ao, NULL, &r.audit, err, errlen);
    if (ret < 0) return ret;
    ret = -1;
    if (!(r.db = admin_pg_connect(cfg, "ticketd-report", err, errlen))) goto out;
    PGresult *pr = q(&r, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL);
    if (!pr) goto out;
    PQclear(pr);
    if (!(r.f = open_memstream(&evbuf, &evlen))) {
        admin_set_err(err, errlen, "out of memory");
        goto out;
    }
    if (evidence(&r)) goto out;
    if (fclose(r.f)) {
        r.f = NULL;
        admin_set_err(err, errlen, "out of memory");
        goto out;
    }
    r.f = NULL;
    PQclear(PQexec(r.db, "COMMIT"));
    sha256_hex(evbuf, evlen, res->sha256);

    /* Which cluster: its id (a reader handle; no group, no subscription). */
    if ((rk = admin_kafka_reader(cfg, brokers, "ticketd-report-reader", "ticketd-report", err,
                                 errlen)))
        cluster = rd_kafka_clusterid(rk, REPORT_CLUSTER_ID_TIMEOUT_MS);

    FILE *f = open_memstream(&res->html, &res->len);
    if (!f) {
        admin_set_err(err, errlen, "out of memory");
        goto out;
    }
    fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<title>ticketd report: ", f);
    esc(f, event_id);
    fputs("</title>\n", f);
    fputs(style, f);
    fputs("</head>\n<body>\n<h1>Post-event report: ", f);
    esc(f, event_id);
    fputs("</h1>\n" EVIDENCE_BEGIN, f);
    fwrite(evbuf, 1, evlen, f);
    fputs(EVIDENCE_END "\n", f);
    cluster_state(&r, f);
    about(&r, f, brokers, cluster, res->sha256);
    fputs("</body>\n</html>\n", f);
    if (fclose(f)) {
        free(res->html);
        res->html = NULL;
        admin_set_err(err, errlen, "out of memory");
        goto out;
    }
    res->missing = jint(r.audit, "missing");
    res->complete = res->missing == 0;
    log_info("report", "event=report_done applications=%" PRId64 " missing=%lld bytes=%zu",
             jint(r.audit, "applications"), res->missing, res->len);
    ret = 0;
out:
    if (r.f) fclose(r.f);
    free(evbuf);
    if (cluster) rd_kafka_mem_free(rk, cluster);
    admin_kafka_destroy(rk);
    PQfinish(r.db);
    json_object_put(r.audit);
    return ret;
}

/* ------------------------------------------------------------------ CLI */

struct report_cli_opts {
    const char *event_id;
    const char *out;
};

static void report_usage(FILE *out)
{
    fprintf(out,
            "usage: ticketd report --event-id E [--out FILE.html] [--json] [settings flags]\n"
            "  The post-event report of show E as one self-contained HTML document: the\n"
            "  audit's verdict, the evidence (each number with its source), a timeline, the\n"
            "  dead letters and every application not where it should be.\n"
            "  --out FILE  write the HTML there and print a summary line (default: HTML on stdout)\n"
            "  --json      the summary as JSON (needs --out)\n"
            "  exit status: 0 nothing missing, 1 something missing, 2 error\n");
}

static int write_file(const char *path, const char *data, size_t len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        admin_set_err(err, errlen, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    size_t n = fwrite(data, 1, len, f);
    if (fclose(f) != 0 || n != len) {
        admin_set_err(err, errlen, "cannot write %s", path);
        return -1;
    }
    return 0;
}

static int report_cli_run(const struct cfg *cfg, const void *opts, FILE *human_out,
                          json_object **json_out, char *err, size_t errlen)
{
    const struct report_cli_opts *o = opts;
    if (json_out && !o->out) {
        admin_set_err(err, errlen, "--json needs --out FILE (the HTML goes there)");
        return -2;
    }
    struct report_result res;
    int r = report_run(cfg, cfg->kafka_brokers, o->event_id, &res, err, errlen);
    if (r < 0) return r;
    if (!o->out) {
        fwrite(res.html, 1, res.len, human_out);
    } else if (write_file(o->out, res.html, res.len, err, errlen)) {
        free(res.html);
        return -1;
    } else if (human_out) {
        fprintf(human_out, "%s: %s, %lld missing, evidence sha256 %s\n", o->out,
                res.complete ? "complete" : "incomplete", res.missing, res.sha256);
    } else {
        json_object *j = json_object_new_object();
        json_object_object_add(j, "out", json_object_new_string(o->out));
        json_object_object_add(j, "verdict",
                               json_object_new_string(res.complete ? "complete" : "incomplete"));
        json_object_object_add(j, "missing", json_object_new_int64(res.missing));
        json_object_object_add(j, "evidence_sha256", json_object_new_string(res.sha256));
        *json_out = j;
    }
    free(res.html);
    return res.missing > 0;
}

int report_main(struct cfg *loaded, int argc, char **argv)
{
    (void)loaded; /* reloaded by admin_cli_main, with the settings flags that follow our own */
    struct report_cli_opts opts = {0};
    const struct admin_cli_flag flags[] = {
        {.name = "--event-id", .value = &opts.event_id, .required = true},
        {.name = "--out", .value = &opts.out},
        {.name = NULL}};
    const struct admin_cli_cmd cmd = {"report", report_usage, flags,
                                      "'http://HOST:PORT/admin/report?event_id=E'",
                                      report_cli_run, 1, 0}; /* 1: something is missing */
    return admin_cli_main(&cmd, &opts, argc, argv);
}
