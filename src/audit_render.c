/* audit_render: the audit's report of a finished run, as JSON and as human text (see
 * audit.h for what the categories and the verdict mean). */
#include <inttypes.h>
#include <string.h>

#include "admin_common.h"
#include "audit_ctx.h"

static json_object *cat_json(const struct cat *k)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "count", json_object_new_int64(k->count));
    json_object_object_add(o, "items", json_object_get(k->items));
    json_object_object_add(o, "truncated",
                           json_object_new_boolean(k->count > (int64_t)json_object_array_length(k->items)));
    return o;
}

static int64_t part_lag(const struct part_stat *ps)
{
    int64_t from = ps->committed >= 0 ? ps->committed : ps->low;
    return ps->high > from ? ps->high - from : 0;
}

int64_t audit_in_flight(const struct audit_ctx *a)
{
    return a->in_grace + a->pending;
}

static const char *verdict(const struct audit_ctx *a)
{
    return a->missing ? "incomplete" : audit_in_flight(a) ? "in_progress" : "complete";
}

static void verdict_line(const struct audit_ctx *a, FILE *out)
{
    if (a->missing == 0 && audit_in_flight(a)) {
        fprintf(out, "in progress: %" PRId64 " applications, 0 missing, %" PRId64
                " not through yet (within AUDIT_GRACE)\n", a->applications, audit_in_flight(a));
        return;
    }
    if (a->missing == 0) {
        fprintf(out, "complete: %" PRId64 " applications, 0 missing\n", a->applications);
        return;
    }
    fprintf(out, "incomplete: %" PRId64 " applications, %" PRId64 " missing: ", a->applications,
            a->missing);
    size_t n = json_object_array_length(a->missing_ids);
    for (size_t i = 0; i < n; i++)
        fprintf(out, "%s%s", i ? "," : "",
                json_object_get_string(json_object_array_get_idx(a->missing_ids, i)));
    if ((int64_t)n < a->missing) fprintf(out, ",... (%" PRId64 " more)", a->missing - (int64_t)n);
    fputc('\n', out);
}

json_object *audit_report_json(const struct audit_ctx *a)
{
    json_object *root = json_object_new_object();
    json_object_object_add(root, "verdict", json_object_new_string(verdict(a)));
    json_object_object_add(root, "in_flight", json_object_new_int64(audit_in_flight(a)));
    json_object_object_add(root, "applications", json_object_new_int64(a->applications));
    json_object_object_add(root, "missing", json_object_new_int64(a->missing));
    json_object_object_add(root, "missing_ids", json_object_get(a->missing_ids));
    json_object_object_add(root, "missing_ids_truncated",
                           json_object_new_boolean(a->missing >
                                                   (int64_t)json_object_array_length(a->missing_ids)));
    json_object *filter = json_object_new_object();
    json_object_object_add(filter, "event_id", admin_json_text(a->opts->event_id));
    json_object_object_add(filter, "since", admin_json_text(a->opts->since));
    json_object_object_add(root, "filter", filter);
    json_object_object_add(root, "topic", json_object_new_string(a->cfg->topic));
    json_object_object_add(root, "dlq_topic", json_object_new_string(a->cfg->dlq_topic));
    json_object_object_add(root, "consumer_group", json_object_new_string(a->cfg->consumer_group));
    json_object_object_add(root, "grace_ms", json_object_new_int64(a->cfg->audit_grace_ms));

    json_object *stages = json_object_new_object();
    json_object *s1 = json_object_new_object();
    json_object_object_add(s1, "applications", json_object_new_int64(a->applications));
    json_object_object_add(s1, "outbox_rows", json_object_new_int64(a->outbox_rows));
    json_object_object_add(s1, "outbox_pruned", json_object_new_int64(a->pruned));
    json_object_object_add(s1, a->cats[C_WITHOUT_OUTBOX].key, cat_json(&a->cats[C_WITHOUT_OUTBOX]));
    json_object_object_add(s1, a->cats[C_OUTBOX_ORPHAN].key, cat_json(&a->cats[C_OUTBOX_ORPHAN]));
    json_object_object_add(s1, a->cats[C_PRUNED_UNACCOUNTED].key,
                           cat_json(&a->cats[C_PRUNED_UNACCOUNTED]));
    json_object_object_add(stages, "applications_outbox", s1);

    json_object *s2 = json_object_new_object();
    json_object_object_add(s2, "outbox_rows", json_object_new_int64(a->outbox_rows));
    json_object_object_add(s2, "published", json_object_new_int64(a->outbox_published));
    int64_t verified = 0, messages = 0;
    for (int p = 0; p < a->nparts; p++) {
        verified += a->parts[p].verified;
        messages += a->parts[p].messages;
    }
    json_object_object_add(s2, "verified", json_object_new_int64(verified));
    json_object_object_add(s2, "topic_messages", json_object_new_int64(messages));
    json_object_object_add(s2, "in_grace", json_object_new_int64(a->in_grace));
    json_object_object_add(s2, "outside_scope", json_object_new_int64(a->outside_scope));
    for (int c = C_UNPUBLISHED; c <= C_EXPIRED_UNCONSUMED; c++)
        json_object_object_add(s2, a->cats[c].key, cat_json(&a->cats[c]));
    json_object_object_add(stages, "outbox_kafka", s2);

    json_object *s3 = json_object_new_object();
    json_object_object_add(s3, "group", json_object_new_string(a->cfg->consumer_group));
    json_object_object_add(s3, "processed", json_object_new_int64(a->processed));
    json_object_object_add(s3, "pending", json_object_new_int64(a->pending));
    json_object *parts = json_object_new_array();
    int64_t lag = 0;
    for (int p = 0; p < a->nparts; p++) {
        const struct part_stat *ps = &a->parts[p];
        json_object *o = json_object_new_object();
        json_object_object_add(o, "partition", json_object_new_int(p));
        json_object_object_add(o, "low", json_object_new_int64(ps->low));
        json_object_object_add(o, "high", json_object_new_int64(ps->high));
        json_object_object_add(o, "committed",
                               ps->committed >= 0 ? json_object_new_int64(ps->committed) : NULL);
        json_object_object_add(o, "lag", json_object_new_int64(part_lag(ps)));
        json_object_object_add(o, "rows", json_object_new_int64(ps->rows));
        json_object_object_add(o, "verified", json_object_new_int64(ps->verified));
        json_object_object_add(o, "expired", json_object_new_int64(ps->expired));
        json_object_object_add(o, "messages", json_object_new_int64(ps->messages));
        json_object_array_add(parts, o);
        lag += part_lag(ps);
    }
    json_object_object_add(s3, "lag", json_object_new_int64(lag));
    json_object_object_add(s3, "partitions", parts);
    for (int c = C_UNHANDLED; c < C_COUNT; c++)
        json_object_object_add(s3, a->cats[c].key, cat_json(&a->cats[c]));
    json_object_object_add(stages, "kafka_consumer", s3);
    json_object_object_add(root, "stages", stages);
    return root;
}

static void human_cat(const struct cat *k, FILE *out)
{
    fprintf(out, "  %-66s %" PRId64 "%s\n", k->title, k->count,
            k->count && k->missing ? "  <-- MISSING" : "");
    size_t n = json_object_array_length(k->items);
    for (size_t i = 0; i < n && i < AUDIT_HUMAN_DETAILS; i++) {
        json_object *d = NULL;
        json_object_object_get_ex(json_object_array_get_idx(k->items, i), "detail", &d);
        fprintf(out, "    - %s\n", json_object_get_string(d));
    }
    if (k->count > AUDIT_HUMAN_DETAILS)
        fprintf(out, "    ... %" PRId64 " more (--json lists up to %d)\n",
                k->count - AUDIT_HUMAN_DETAILS, AUDIT_LIST_MAX);
}

void audit_report_human(const struct audit_ctx *a, FILE *out)
{
    fprintf(out, "audit of %s%s%s%s: topic %s (%d partitions), DLQ %s, group %s, grace %" PRId64
            " ms\n",
            a->opts->event_id ? "event " : "all events", a->opts->event_id ? a->opts->event_id : "",
            a->opts->since ? ", since " : "", a->opts->since ? a->opts->since : "", a->cfg->topic,
            a->nparts, a->cfg->dlq_topic, a->cfg->consumer_group, a->cfg->audit_grace_ms);
    fprintf(out, "\nstage 1: applications <-> outbox\n");
    fprintf(out, "  %-66s %" PRId64 "\n", "applications", a->applications);
    fprintf(out, "  %-66s %" PRId64 "\n", "outbox rows", a->outbox_rows);
    fprintf(out, "  %-66s %" PRId64 "\n", "older than OUTBOX_RETENTION, outbox row pruned", a->pruned);
    human_cat(&a->cats[C_WITHOUT_OUTBOX], out);
    human_cat(&a->cats[C_OUTBOX_ORPHAN], out);
    human_cat(&a->cats[C_PRUNED_UNACCOUNTED], out);

    int64_t verified = 0, messages = 0, lag = 0;
    for (int p = 0; p < a->nparts; p++) {
        verified += a->parts[p].verified;
        messages += a->parts[p].messages;
        lag += part_lag(&a->parts[p]);
    }
    fprintf(out, "\nstage 2: outbox <-> kafka\n");
    fprintf(out, "  %-66s %" PRId64 "\n", "published rows", a->outbox_published);
    fprintf(out, "  %-66s %" PRId64 "\n", "verified (ce_id found at the recorded offset)", verified);
    fprintf(out, "  %-66s %" PRId64 "\n", "topic messages read", messages);
    fprintf(out, "  %-66s %" PRId64 "\n", "unpublished within the grace window", a->in_grace);
    for (int c = C_UNPUBLISHED; c <= C_EXPIRED_UNCONSUMED; c++) human_cat(&a->cats[c], out);

    fprintf(out, "\nstage 3: kafka <-> consumer (group %s)\n", a->cfg->consumer_group);
    fprintf(out, "  %9s %12s %12s %12s %10s\n", "partition", "low", "high", "committed", "lag");
    for (int p = 0; p < a->nparts; p++) {
        const struct part_stat *ps = &a->parts[p];
        char committed[24];
        if (ps->committed >= 0)
            snprintf(committed, sizeof committed, "%" PRId64, ps->committed);
        else
            snprintf(committed, sizeof committed, "-");
        fprintf(out, "  %9d %12" PRId64 " %12" PRId64 " %12s %10" PRId64 "\n", p, ps->low,
                ps->high, committed, part_lag(ps));
    }
    fprintf(out, "  %-66s %" PRId64 "\n", "total lag (messages)", lag);
    fprintf(out, "  %-66s %" PRId64 "\n", "processed, every effect done", a->processed);
    fprintf(out, "  %-66s %" PRId64 "\n", "pending (not consumed yet, within the grace window)", a->pending);
    for (int c = C_UNHANDLED; c < C_COUNT; c++) human_cat(&a->cats[c], out);
    fputc('\n', out);
    verdict_line(a, out);
}
