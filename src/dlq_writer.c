/* dlq_writer: the dead-letter writer, on the loop (see dlq_writer.h). */
#include "dlq_writer.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_pool.h"
#include "dlq.h"
#include "effects.h"
#include "kafka_common.h"
#include "log.h"
#include "metrics.h"

struct dlq_writer {
    const struct cfg *cfg;
    struct dbp *db;
    dlq_written_fn cb;
    rd_kafka_t *rk;             /* idempotent acks=all producer */
    rd_kafka_queue_t *q;
    struct kafka_bridge *bridge;
    unsigned inflight;
    bool stopped;
};

static const char dead_letter_sql[] =
    "INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition, src_offset,"
    " dlq_partition, dlq_offset, attempts, error_class, error_message)"
    " SELECT coalesce($1::uuid, md5($3 || '/' || $4 || '/' || $5)::uuid), $2::bigint, $3,"
    " $4::int, $5::bigint, $6::int, $7::bigint, $8::int, $9, $10"
    " WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE dlq_partition = $6::int"
    " AND dlq_offset = $7::bigint)";

static int produce(struct dlq_writer *w, struct dlq_letter *l, char *errbuf, size_t errlen)
{
    const rd_kafka_message_t *m = l->m;
    rd_kafka_headers_t *orig = NULL;
    char num[4][32];

    rd_kafka_headers_t *h =
        rd_kafka_message_headers(m, &orig) == RD_KAFKA_RESP_ERR_NO_ERROR && orig
            ? rd_kafka_headers_copy(orig)
            : rd_kafka_headers_new(8);
    for (size_t i = 0; i < DLQ_HEADER_COUNT; i++)
        rd_kafka_header_remove(h, dlq_header_names[i]); /* a replayed event failing again */
    rd_kafka_timestamp_type_t tstype;
    snprintf(num[0], sizeof num[0], "%" PRId32, m->partition);
    snprintf(num[1], sizeof num[1], "%" PRId64, m->offset);
    snprintf(num[2], sizeof num[2], "%" PRId64, rd_kafka_message_timestamp(m, &tstype));
    snprintf(num[3], sizeof num[3], "%d", l->attempts);
    rd_kafka_header_add(h, DLQ_H_ORIGINAL_TOPIC, -1, w->cfg->topic, -1);
    rd_kafka_header_add(h, DLQ_H_ORIGINAL_PARTITION, -1, num[0], -1);
    rd_kafka_header_add(h, DLQ_H_ORIGINAL_OFFSET, -1, num[1], -1);
    rd_kafka_header_add(h, DLQ_H_ORIGINAL_TIMESTAMP, -1, num[2], -1);
    rd_kafka_header_add(h, DLQ_H_CONSUMER_GROUP, -1, w->cfg->consumer_group, -1);
    rd_kafka_header_add(h, DLQ_H_ATTEMPTS, -1, num[3], -1);
    rd_kafka_header_add(h, DLQ_H_ERROR_CLASS, -1, l->error_class, -1);
    rd_kafka_header_add(h, DLQ_H_ERROR_MESSAGE, -1, l->error_message, -1);

    rd_kafka_resp_err_t err = rd_kafka_producev(
        w->rk, RD_KAFKA_V_TOPIC(w->cfg->dlq_topic), RD_KAFKA_V_KEY(m->key, m->key_len),
        RD_KAFKA_V_VALUE(m->payload, m->len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_OPAQUE(l), RD_KAFKA_V_END);
    if (err) {
        rd_kafka_headers_destroy(h); /* still ours when producev fails */
        snprintf(errbuf, errlen, "%s", rd_kafka_err2str(err));
        return -1;
    }
    w->inflight++;
    return 0;
}

struct record_ctx {
    struct dlq_writer *w;
    struct dlq_letter *l;
};

static void on_recorded(void *ud, const PGresult *res, const char *error)
{
    struct record_ctx *rc = ud;
    struct dlq_writer *w = rc->w;
    struct dlq_letter *l = rc->l;
    free(rc);
    w->inflight--;
    if (res && PQresultStatus(res) == PGRES_COMMAND_OK) w->cb(l, true, DLQ_STEP_RECORD, NULL);
    else w->cb(l, false, DLQ_STEP_RECORD, error ? error : PQresultErrorMessage(res));
}

/* The dead_letters row of an acknowledged letter. A poison message's event id is its ce_id
 * when that is a UUID (else the statement derives one from the source position), its
 * application id the key when that is a decimal number. */
static int record(struct dlq_writer *w, struct dlq_letter *l, char *errbuf, size_t errlen)
{
    const rd_kafka_message_t *m = l->m;
    char app[24] = "", src_part[16], src_off[24], dlq_part[16], dlq_off[24], attempts[16];
    char idbuf[UUID_STR_LEN + 1];
    const char *event_id = l->poison ? NULL : l->event_id;
    const char *app_id = NULL;

    if (l->poison) {
        rd_kafka_headers_t *h = NULL;
        const void *id = NULL;
        size_t len = 0;
        if (rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR && h &&
            rd_kafka_header_get_last(h, CE_ID, &id, &len) == RD_KAFKA_RESP_ERR_NO_ERROR && id &&
            effects_is_uuid(id, len)) {
            memcpy(idbuf, id, len);
            idbuf[len] = '\0';
            event_id = idbuf;
        }
        if (m->key && m->key_len > 0 && m->key_len < 19) {
            size_t i = 0;
            for (; i < m->key_len && ((const char *)m->key)[i] >= '0' &&
                   ((const char *)m->key)[i] <= '9'; i++)
                app[i] = ((const char *)m->key)[i];
            app[i] = '\0';
            if (i == m->key_len) app_id = app;
        }
    } else {
        snprintf(app, sizeof app, "%" PRId64, l->application_id);
        app_id = app;
    }
    snprintf(src_part, sizeof src_part, "%" PRId32, m->partition);
    snprintf(src_off, sizeof src_off, "%" PRId64, m->offset);
    snprintf(dlq_part, sizeof dlq_part, "%" PRId32, l->dlq_partition);
    snprintf(dlq_off, sizeof dlq_off, "%" PRId64, l->dlq_offset);
    snprintf(attempts, sizeof attempts, "%d", l->attempts);
    const char *params[10] = {event_id, app_id, w->cfg->topic, src_part, src_off, dlq_part,
                              dlq_off, attempts, l->error_class, l->error_message};
    struct record_ctx *rc = malloc(sizeof *rc);
    if (!rc || dbp_query(w->db, dead_letter_sql, 10, params, on_recorded, rc) != 0) {
        free(rc);
        snprintf(errbuf, errlen, "database unavailable");
        return -1;
    }
    rc->w = w;
    rc->l = l;
    w->inflight++;
    return 0;
}

int dlq_writer_write(struct dlq_writer *w, struct dlq_letter *l, enum dlq_step *failed,
                     char *err, size_t errlen)
{
    *failed = l->dlq_partition < 0 ? DLQ_STEP_PRODUCE : DLQ_STEP_RECORD;
    return *failed == DLQ_STEP_PRODUCE ? produce(w, l, err, errlen) : record(w, l, err, errlen);
}

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    struct dlq_writer *w = opaque;
    struct dlq_letter *l = m->_private;
    char err[128];

    if (!l || w->stopped) return;
    w->inflight--;
    if (m->err) {
        w->cb(l, false, DLQ_STEP_PRODUCE, rd_kafka_err2str(m->err));
        return;
    }
    metrics_counter_add("ticketd_dlq_produced_total", NULL, 1);
    l->dlq_partition = m->partition;
    l->dlq_offset = m->offset;
    if (record(w, l, err, sizeof err) != 0) w->cb(l, false, DLQ_STEP_RECORD, err);
}

static void on_ready(void *ud)
{
    struct dlq_writer *w = ud;
    while (w->rk && rd_kafka_poll(w->rk, 0) > 0) {
    }
}

int dlq_writer_create(struct dlq_writer **out, uv_loop_t *loop, const struct cfg *cfg,
                      const char *brokers, struct dbp *db, dlq_written_fn cb)
{
    char err[512];
    struct dlq_writer *w = calloc(1, sizeof *w);
    if (!w) return -1;
    w->cfg = cfg;
    w->db = db;
    w->cb = cb;
    metrics_describe("ticketd_dlq_produced_total", "counter",
                     "events produced to the dead-letter topic and acknowledged");

    /* acks=all + idempotence; delivery reports and logs served on the loop. */
    rd_kafka_conf_t *conf = kafka_conf_new(brokers, cfg->kafka_config, err, sizeof err);
    if (!conf) {
        log_error("consumer", "event=config_error err=\"%s\"", err);
        free(w);
        return -1;
    }
    if (kafka_conf_idempotent_producer(conf, cfg->kafka_config, "ticketd-dlq", err,
                                       sizeof err) != 0 ||
        rd_kafka_conf_set(conf, "log.queue", "true", err, sizeof err) != RD_KAFKA_CONF_OK) {
        log_error("consumer", "event=config_error err=\"%s\"", err);
        rd_kafka_conf_destroy(conf);
        free(w);
        return -1;
    }
    kafka_conf_log_to_ours(conf);
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_conf_set_opaque(conf, w);
    w->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!w->rk) {
        rd_kafka_conf_destroy(conf);
        log_error("consumer", "event=dlq_producer_failed err=\"%s\"", err);
        free(w);
        return -1;
    }
    rd_kafka_set_log_queue(w->rk, NULL); /* logs to the main queue, served on the loop */
    w->q = rd_kafka_queue_get_main(w->rk);
    if (kafka_bridge_start(&w->bridge, loop, w->q, on_ready, w) != 0) {
        dlq_writer_free(w);
        return -1;
    }
    *out = w;
    return 0;
}

unsigned dlq_writer_inflight(const struct dlq_writer *w)
{
    return w ? w->inflight : 0;
}

void dlq_writer_stop(struct dlq_writer *w)
{
    if (w->stopped) return;
    w->stopped = true;
    if (w->bridge) kafka_bridge_close(w->bridge);
    w->bridge = NULL;
    rd_kafka_purge(w->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
}

void dlq_writer_free(struct dlq_writer *w)
{
    if (!w) return;
    dlq_writer_stop(w);
    if (w->q) rd_kafka_queue_destroy(w->q);
    rd_kafka_destroy(w->rk);
    free(w);
}
