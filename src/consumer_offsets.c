/* consumer_offsets: where the consumer's offsets go and where they come from: the
 * asynchronous commits of each partition's finished prefix, the watch on offset resets
 * ("offset out of range" is never silent, consumer.h) and the lag gauge. */
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumer_int.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"
#include "metrics.h"

/* The consumer the lag collector reads (metrics has no way to remove a collector). */
static struct consumer *lag_consumer;
static bool lag_collector_added;

/* ---- commits ---- */

void cons_commit_now(struct consumer *c)
{
    if (!c->rk || c->phase >= PH_DESTROYING) return;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(8);
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (!p || !p->assigned || p->next_commit <= p->commit_sent) continue;
        rd_kafka_topic_partition_list_add(l, c->cfg->topic, p->partition)->offset = p->next_commit;
        p->commit_sent = p->next_commit;
    }
    if (l->cnt > 0) {
        rd_kafka_resp_err_t err = rd_kafka_commit(c->rk, l, 1 /* async */);
        if (err) {
            log_warn("consumer", "event=commit_failed err=\"%s\"", rd_kafka_err2str(err));
            for (int i = 0; i < l->cnt; i++) {
                struct cpart *p = cons_part_get(c, l->elems[i].partition);
                if (p) p->commit_sent = p->commit_acked;
            }
        }
    }
    rd_kafka_topic_partition_list_destroy(l);
}

static void on_commit_timer(uv_timer_t *t)
{
    struct consumer *c = t->data;
    c->commit_scheduled = false;
    cons_commit_now(c);
}

void cons_schedule_commit(struct consumer *c)
{
    if (c->commit_scheduled || c->phase >= PH_KAFKA_CLOSING) return;
    c->commit_scheduled = true;
    uint64_t delay = COMMIT_INTERVAL_MS;
    for (int i = 0; i < c->commit_failures && delay < DB_WAIT_MAX_MS; i++) delay *= 2;
    uv_timer_start(&c->commit_timer, on_commit_timer,
                   delay < DB_WAIT_MAX_MS ? delay : DB_WAIT_MAX_MS, 0);
}

void cons_commit_result(struct consumer *c, rd_kafka_resp_err_t err,
                          const rd_kafka_topic_partition_list_t *offsets)
{
    if (err == RD_KAFKA_RESP_ERR__NO_OFFSET) return; /* nothing to commit */
    bool failed = false;
    for (int i = 0; offsets && i < offsets->cnt; i++) {
        const rd_kafka_topic_partition_t *e = &offsets->elems[i];
        struct cpart *p = cons_part_get(c, e->partition);
        rd_kafka_resp_err_t perr = err ? err : e->err;
        if (perr) {
            /* the first of a run of failures at warn, the retries (backing off) at debug */
            log_at(c->commit_failures ? LOG_DEBUG : LOG_WARN, "consumer",
                   "event=commit_failed partition=%" PRId32 " offset=%" PRId64 " err=\"%s\"",
                   e->partition, e->offset, rd_kafka_err2str(perr));
            failed = true;
            if (p && p->commit_sent == e->offset) {
                p->commit_sent = p->commit_acked;
                cons_schedule_commit(c);
            }
        } else if (p && e->offset > p->commit_acked) {
            p->commit_acked = e->offset;
        }
    }
    c->commit_failures = failed ? c->commit_failures + 1 : 0;
}

void cons_offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                             rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    cons_commit_result(opaque, err, offsets);
}

void cons_offset_reset(struct consumer *c, rd_kafka_message_t *m)
{
    char qb[600];
    const char *why = rd_kafka_message_errstr(m);
    int32_t partition = m->partition;
    bool first_start = strstr(why, rd_kafka_err2str(RD_KAFKA_RESP_ERR__NO_OFFSET)) != NULL;

    if (first_start) {
        log_info("consumer", "event=no_committed_offset partition=%" PRId32
                 " action=start_at_log_start", partition);
    } else {
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", partition);
        metrics_counter_add("ticketd_consumer_offset_out_of_range_total", labels, 1);
        log_error("consumer", "event=offset_out_of_range topic=%s partition=%" PRId32
                  " offset=%" PRId64 " err=%s action=seek_to_log_start"
                  " note=\"events below the log start were deleted before being handled;"
                  " run ticketd audit\"", c->cfg->topic, partition, m->offset, log_quoted(why, qb, sizeof qb));
    }
    struct cpart *p = cons_part_get(c, partition);
    if (p) p->last_seen = -1;
    rd_kafka_topic_partition_list_t *l = cons_one_partition(c, partition, RD_KAFKA_OFFSET_BEGINNING);
    rd_kafka_error_t *err = rd_kafka_seek_partitions(c->rk, l, 0 /* async */);
    rd_kafka_topic_partition_list_destroy(l);
    if (err) {
        log_error("consumer", "event=seek_failed partition=%" PRId32 " err=\"%s\"", partition,
                  rd_kafka_error_string(err));
        rd_kafka_error_destroy(err);
    }
}

static void lag_collect(void *ud)
{
    struct consumer *c = lag_consumer;
    if (!c || c->phase != PH_RUNNING) return;
    for (int32_t i = 0; i < c->nparts; i++) {
        struct cpart *p = c->parts[i];
        if (!p) continue;
        int64_t lo, hi, pos;
        if (rd_kafka_get_watermark_offsets(c->rk, c->cfg->topic, p->partition, &lo, &hi) != 0 ||
            hi < 0)
            continue;
        if (p->head) pos = p->head->m->offset;
        else if (p->next_commit >= 0) pos = p->next_commit;
        else if (p->commit_acked >= 0) pos = p->commit_acked;
        else continue;
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%" PRId32 "\"", p->partition);
        metrics_gauge_set("ticketd_consumer_lag", labels, (double)(hi > pos ? hi - pos : 0));
    }
}

/* rdkafka's own log lines (kafka_log_cb). With log.queue they are served by our polls, on
 * the loop. An offset reset caused by an error (out of range, log truncation) is logged by
 * rdkafka at warning level with facility OFFSET ("<topic> [<partition>]: offset reset (at
 * offset ..."); resets for a missing committed offset (a new group) only at debug level. */
void cons_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    if (level <= 4 && strcmp(fac, "OFFSET") == 0 && strstr(buf, "offset reset")) {
        char quoted[512];
        log_quote(buf, quoted, sizeof quoted);
        const char *br = strstr(buf, " [");
        long partition = br ? strtol(br + 2, NULL, 10) : -1;
        char labels[48];
        snprintf(labels, sizeof labels, "partition=\"%ld\"", partition);
        metrics_counter_add("ticketd_consumer_offset_out_of_range_total", labels, 1);
        log_error("consumer", "event=offset_out_of_range partition=%ld detail=%s"
                  " action=continue_at_log_start note=\"events below the log start were"
                  " deleted before being handled; run ticketd audit\"", partition, quoted);
        return;
    }
    kafka_log_cb(rk, level, fac, buf);
}


void cons_lag_watch(struct consumer *c)
{
    lag_consumer = c;
    if (!lag_collector_added) {
        metrics_add_collector(lag_collect, NULL);
        lag_collector_added = true;
    }
}

void cons_lag_unwatch(struct consumer *c)
{
    if (lag_consumer == c) lag_consumer = NULL;
}
