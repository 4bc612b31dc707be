/* admin_kafka: see admin_kafka.h. */
#include "admin_kafka.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin_common.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"


static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

rd_kafka_t *admin_kafka_reader(const struct cfg *cfg, const char *brokers, const char *group,
                               const char *client_id, char *err, size_t errlen)
{
    char e[512];
    rd_kafka_conf_t *conf = kafka_conf_new(brokers, cfg->kafka_config, e, sizeof e);
    if (!conf) {
        admin_set_err(err, errlen, "kafka configuration: %s", e);
        return NULL;
    }
    /* Read-only: no commits, no stored offsets, no reset past data (an out-of-range offset
     * surfaces as an error the reader handles), bounded prefetch, big sequential fetches. */
    const char *const props[][2] = {
        {"group.id", group},
        {"client.id", client_id},
        {"enable.auto.commit", "false"},
        {"enable.auto.offset.store", "false"},
        {"enable.partition.eof", "true"},
        {"auto.offset.reset", "error"},
        {"fetch.max.bytes", "52428800"},
        {"max.partition.fetch.bytes", "8388608"},
        {"queued.max.messages.kbytes", "65536"},
        {"queued.min.messages", "200000"},
        {"fetch.wait.max.ms", "10"},
        {"log.connection.close", "false"},
    };
    for (size_t i = 0; i < sizeof props / sizeof props[0]; i++) {
        if (rd_kafka_conf_set(conf, props[i][0], props[i][1], e, sizeof e) != RD_KAFKA_CONF_OK) {
            admin_set_err(err, errlen, "kafka configuration %s: %s", props[i][0], e);
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    kafka_conf_log_to_ours(conf);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, e, sizeof e);
    if (!rk) {
        admin_set_err(err, errlen, "kafka consumer: %s", e);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    return rk;
}

void admin_kafka_destroy(rd_kafka_t *rk)
{
    if (!rk) return;
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

int admin_group_offsets(const struct cfg *cfg, const char *brokers, const char *client_id,
                        int *n, int64_t **offsets, char *err, size_t errlen)
{
    *n = 0;
    *offsets = NULL;
    rd_kafka_t *group = admin_kafka_reader(cfg, brokers, cfg->consumer_group, client_id, err,
                                           errlen);
    if (!group) return -1;
    int64_t *committed = NULL;
    int nparts = admin_topic_partitions(group, cfg->topic, err, errlen);
    if (nparts < 0) goto fail;
    committed = malloc(((size_t)nparts + 1) * sizeof *committed);
    if (!committed) {
        admin_set_err(err, errlen, "out of memory");
        goto fail;
    }
    for (int p = 0; p < nparts; p++) committed[p] = -1;
    if (admin_committed(group, cfg->topic, nparts, committed, err, errlen)) goto fail;
    admin_kafka_destroy(group);
    *n = nparts;
    *offsets = committed;
    return 0;
fail:
    free(committed);
    admin_kafka_destroy(group);
    return -1;
}

int admin_topic_partitions(rd_kafka_t *rk, const char *topic, char *err, size_t errlen)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    if (!rkt) {
        admin_set_err(err, errlen, "kafka topic %s: %s", topic,
                      rd_kafka_err2str(rd_kafka_last_error()));
        return -1;
    }
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e = rd_kafka_metadata(rk, 0, rkt, &md, ADMIN_KAFKA_TIMEOUT_MS);
    rd_kafka_topic_destroy(rkt);
    if (e) {
        admin_set_err(err, errlen, "kafka metadata for %s: %s (brokers reachable?)", topic,
                      rd_kafka_err2str(e));
        return -1;
    }
    int n = -1;
    if (md->topic_cnt < 1) {
        n = 0;
    } else if (md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        n = md->topics[0].partition_cnt;
    } else if (md->topics[0].err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) {
        n = 0;
    } else {
        admin_set_err(err, errlen, "kafka metadata for %s: %s", topic,
                      rd_kafka_err2str(md->topics[0].err));
    }
    rd_kafka_metadata_destroy(md);
    return n;
}

int admin_watermarks(rd_kafka_t *rk, const char *topic, int32_t partition, int64_t *low,
                     int64_t *high, char *err, size_t errlen)
{
    rd_kafka_resp_err_t e =
        rd_kafka_query_watermark_offsets(rk, topic, partition, low, high, ADMIN_KAFKA_TIMEOUT_MS);
    if (e) {
        admin_set_err(err, errlen, "kafka watermarks of %s/%d: %s", topic, (int)partition,
                      rd_kafka_err2str(e));
        return -1;
    }
    return 0;
}

int admin_committed(rd_kafka_t *rk, const char *topic, int n, int64_t *out, char *err,
                    size_t errlen)
{
    if (n <= 0) return 0;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n);
    for (int p = 0; p < n; p++) rd_kafka_topic_partition_list_add(l, topic, p);
    rd_kafka_resp_err_t e = rd_kafka_committed(rk, l, ADMIN_KAFKA_TIMEOUT_MS);
    if (e) {
        admin_set_err(err, errlen, "kafka committed offsets of the group: %s",
                      rd_kafka_err2str(e));
        rd_kafka_topic_partition_list_destroy(l);
        return -1;
    }
    for (int i = 0; i < l->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &l->elems[i];
        if (tp->partition < 0 || tp->partition >= n) continue;
        if (tp->err) { /* could not read it: never the same as "nothing committed" */
            admin_set_err(err, errlen, "kafka committed offset of %s/%d: %s", topic,
                          (int)tp->partition, rd_kafka_err2str(tp->err));
            rd_kafka_topic_partition_list_destroy(l);
            return -1;
        }
        out[tp->partition] = tp->offset < 0 ? -1 : tp->offset;
    }
    rd_kafka_topic_partition_list_destroy(l);
    return 0;
}

static int reader_assign(struct admin_reader *r, int64_t offset, char *err, size_t errlen)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, r->topic, r->partition)->offset = offset;
    rd_kafka_resp_err_t e = rd_kafka_assign(r->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (e) {
        admin_set_err(err, errlen, "kafka assign %s/%d@%" PRId64 ": %s", r->topic,
                      (int)r->partition, offset, rd_kafka_err2str(e));
        return -1;
    }
    r->next = offset;
    r->eof = false;
    return 0;
}

static void reader_drop_batch(struct admin_reader *r)
{
    while (r->ibatch < r->nbatch) rd_kafka_message_destroy(r->batch[r->ibatch++]);
    r->nbatch = r->ibatch = 0;
}

int admin_reader_open(struct admin_reader *r, rd_kafka_t *rk, const char *topic,
                      int32_t partition, int64_t start, int64_t low, int64_t high, char *err,
                      size_t errlen)
{
    memset(r, 0, sizeof *r);
    r->rk = rk;
    r->topic = topic;
    r->partition = partition;
    r->low = low;
    r->high = high;
    r->queue = rd_kafka_queue_get_consumer(rk);
    if (!r->queue) {
        admin_set_err(err, errlen, "kafka: no consumer queue");
        return -1;
    }
    if (start >= high) {
        r->eof = true;   /* nothing to read: do not assign at all */
        r->next = start;
        return 0;
    }
    return reader_assign(r, start, err, errlen);
}

/* Refills r->batch: 1, 0 when nothing came within one wait, -1 on error. */
static int reader_fill(struct admin_reader *r, char *err, size_t errlen)
{
    r->nbatch = r->ibatch = 0;
    /* consume_batch waits for a full batch until its timeout: take what is queued (timeout
     * 0), and when nothing is, wait for the first message alone. */
    const size_t cap = sizeof r->batch / sizeof r->batch[0];
    ssize_t n = rd_kafka_consume_batch_queue(r->queue, 0, r->batch, cap);
    if (n == 0) {
        rd_kafka_message_t *first = rd_kafka_consume_queue(r->queue, ADMIN_KAFKA_WAIT_MS);
        if (first) {
            r->batch[0] = first;
            n = rd_kafka_consume_batch_queue(r->queue, 0, r->batch + 1, cap - 1);
            n = n < 0 ? 1 : n + 1;
        }
    }
    if (n < 0) {
        admin_set_err(err, errlen, "kafka consume: %s", rd_kafka_err2str(rd_kafka_last_error()));
        return -1;
    }
    r->nbatch = (int)n;
    return n > 0;
}

/* Retention deleted the log under the reader: carry on from the new log start; the caller
 * sees r->low move and counts the rows below it as expired. */
static int reader_skip_to_log_start(struct admin_reader *r, char *err, size_t errlen)
{
    reader_drop_batch(r);
    int64_t low, high;
    if (admin_watermarks(r->rk, r->topic, r->partition, &low, &high, err, errlen)) return -1;
    if (low <= r->next) {
        admin_set_err(err, errlen, "kafka: offset %" PRId64 " of %s/%d out of range (log %" PRId64
                      "..%" PRId64 ")", r->next, r->topic, (int)r->partition, low, high);
        return -1;
    }
    log_warn("admin", "event=log_start_moved topic=%s partition=%d from=%" PRId64 " to=%" PRId64,
             r->topic, (int)r->partition, r->next, low);
    r->low = low;
    return reader_assign(r, low, err, errlen);
}

int admin_reader_next(struct admin_reader *r, rd_kafka_message_t **msg, char *err,
                      size_t errlen)
{
    int64_t idle_ms = 0;
    for (;;) {
        if (r->eof || r->next >= r->high) return 0;
        if (r->ibatch >= r->nbatch) {
            int got = reader_fill(r, err, errlen);
            if (got < 0) return -1;
            if (got == 0) {
                idle_ms += ADMIN_KAFKA_WAIT_MS;
                if (idle_ms >= ADMIN_KAFKA_STALL_MS) {
                    admin_set_err(err, errlen,
                                  "kafka: no progress reading %s/%d at offset %" PRId64
                                  " (high watermark %" PRId64 ") for %d s",
                                  r->topic, (int)r->partition, r->next, r->high,
                                  ADMIN_KAFKA_STALL_MS / 1000);
                    return -1;
                }
                continue;
            }
            idle_ms = 0;
        }
        rd_kafka_message_t *m = r->batch[r->ibatch++];
        /* Stale messages of an earlier assignment (another partition) are skipped. */
        if (m->rkt && (m->partition != r->partition ||
                       strcmp(rd_kafka_topic_name(m->rkt), r->topic) != 0)) {
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            r->eof = true;
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
            m->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE) {
            rd_kafka_message_destroy(m);
            if (reader_skip_to_log_start(r, err, errlen)) return -1;
            continue;
        }
        if (m->err) {
            admin_set_err(err, errlen, "kafka reading %s/%d: %s", r->topic, (int)r->partition,
                          rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            return -1;
        }
        if (m->offset < r->next) { /* a repeat after a re-assign */
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->offset >= r->high) { /* produced after the watermark was read */
            rd_kafka_message_destroy(m);
            r->eof = true;
            return 0;
        }
        r->next = m->offset + 1;
        *msg = m;
        return 1;
    }
}

void admin_reader_close(struct admin_reader *r)
{
    reader_drop_batch(r);
    if (r->rk) rd_kafka_assign(r->rk, NULL);
    if (r->queue) rd_kafka_queue_destroy(r->queue);
    r->queue = NULL;
}

int admin_scan_topic(rd_kafka_t *rk, const char *topic, int64_t timeout_ms, admin_visit_fn visit,
                     void *ud, char *err, size_t errlen)
{
    int64_t deadline = timeout_ms > 0 ? mono_ms() + timeout_ms : INT64_MAX;
    int n = admin_topic_partitions(rk, topic, err, errlen);
    if (n < 0) return -1;
    for (int p = 0; p < n; p++) {
        int64_t low, high;
        if (admin_watermarks(rk, topic, p, &low, &high, err, errlen)) return -1;
        struct admin_reader rd;
        int mr = admin_reader_open(&rd, rk, topic, p, low, low, high, err, errlen);
        rd_kafka_message_t *m;
        while (mr == 0 && (mr = admin_reader_next(&rd, &m, err, errlen)) == 1) {
            visit(ud, m);
            rd_kafka_message_destroy(m);
            mr = 0;
            if (mono_ms() > deadline) {
                admin_set_err(err, errlen, "timed out reading %s up to its high watermarks",
                              topic);
                mr = -1;
            }
        }
        admin_reader_close(&rd);
        if (mr < 0) return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ message fields */

bool admin_header(const rd_kafka_message_t *m, const char *name, char *out, size_t outlen)
{
    out[0] = '\0';
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(m, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR || !hdrs) return false;
    const void *val = NULL;
    size_t size = 0;
    if (rd_kafka_header_get_last(hdrs, name, &val, &size) != RD_KAFKA_RESP_ERR_NO_ERROR || !val)
        return false;
    size_t n = size < outlen - 1 ? size : outlen - 1;
    memcpy(out, val, n);
    out[n] = '\0';
    return true;
}

void admin_key_text(const rd_kafka_message_t *m, char *out, size_t outlen)
{
    size_t n = m->key_len < outlen - 1 ? m->key_len : outlen - 1;
    const unsigned char *k = m->key;
    for (size_t i = 0; i < n; i++) out[i] = (k[i] >= 0x20 && k[i] < 0x7f) ? (char)k[i] : '?';
    out[n] = '\0';
}
