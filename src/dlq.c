/* dlq: list and replay dead letters (see dlq.h). Blocking code: CLI or thread pool only. */
#include "dlq.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "admin_cli.h"
#include "admin_kafka.h"
#include "admin_pg.h"
#include "db_pool.h"
#include "effects.h"
#include "kafka_common.h"
#include "log.h"
#include "validate.h"

const char *const dlq_header_names[DLQ_HEADER_COUNT] = {
    DLQ_H_ORIGINAL_TOPIC, DLQ_H_ORIGINAL_PARTITION, DLQ_H_ORIGINAL_OFFSET,
    DLQ_H_ORIGINAL_TIMESTAMP, DLQ_H_CONSUMER_GROUP, DLQ_H_ATTEMPTS,
    DLQ_H_ERROR_CLASS, DLQ_H_ERROR_MESSAGE,
};

/* ---- reading the DLQ topic ---- */

/* Calls visit for every message of the DLQ topic below its high watermarks, within
 * DLQ_READ_TIMEOUT_MS. Returns 0, or -1 with err. */
static int read_dlq(const struct cfg *cfg, const char *brokers, admin_visit_fn visit, void *ud,
                    char *err, size_t errlen)
{
    char group[96];
    snprintf(group, sizeof group, "ticketd-dlq-reader-%d", (int)getpid());
    rd_kafka_t *rk = admin_kafka_reader(cfg, brokers, group, "ticketd-dlq-reader", err, errlen);
    if (!rk) return -1;
    int rc = admin_scan_topic(rk, cfg->dlq_topic, DLQ_READ_TIMEOUT_MS, visit, ud, err, errlen);
    admin_kafka_destroy(rk);
    return rc;
}

/* A JSON string from bytes that may not be UTF-8: invalid or control bytes become '?'. */
static json_object *safe_string(const char *s, size_t len)
{
    char *copy = malloc(len + 1);
    if (!copy) return NULL;
    memcpy(copy, s, len);
    copy[len] = '\0';
    if (validate_utf8_text(copy, len) < 0) {
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)copy[i] < 0x20 || (unsigned char)copy[i] > 0x7e) copy[i] = '?';
    }
    json_object *o = json_object_new_string_len(copy, (int)len);
    free(copy);
    return o;
}

/* ---- dead_letters rows ---- */

struct dl_row {
    int32_t partition;
    int64_t offset;
    bool replayed;
    char replayed_at[40];
    char dead_lettered_at[40];
};

struct dl_rows {
    struct dl_row *rows;
    size_t n;
};

static int load_rows(PGconn *db, struct dl_rows *out, char *err, size_t errlen)
{
    PGresult *res = admin_pg_exec(db,
                                  "SELECT dlq_partition, dlq_offset, replayed_at IS NOT NULL,"
                                  " coalesce(" DBP_RFC3339_UTC("replayed_at") ", ''),"
                                  " " DBP_RFC3339_UTC("dead_lettered_at")
                                  " FROM dead_letters ORDER BY dlq_partition, dlq_offset, id",
                                  0, NULL, err, errlen);
    if (!res) return -1;
    size_t n = (size_t)PQntuples(res);
    out->rows = calloc(n + 1, sizeof *out->rows);
    out->n = 0;
    if (!out->rows) {
        PQclear(res);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        struct dl_row *r = &out->rows[out->n];
        r->partition = (int32_t)strtol(PQgetvalue(res, (int)i, 0), NULL, 10);
        r->offset = strtoll(PQgetvalue(res, (int)i, 1), NULL, 10);
        /* duplicate (partition, offset) rows cannot be made by the consumer; keep the first */
        if (out->n && out->rows[out->n - 1].partition == r->partition &&
            out->rows[out->n - 1].offset == r->offset)
            continue;
        r->replayed = PQgetvalue(res, (int)i, 2)[0] == 't';
        snprintf(r->replayed_at, sizeof r->replayed_at, "%s", PQgetvalue(res, (int)i, 3));
        snprintf(r->dead_lettered_at, sizeof r->dead_lettered_at, "%s", PQgetvalue(res, (int)i, 4));
        out->n++;
    }
    PQclear(res);
    return 0;
}

static struct dl_row *find_row(const struct dl_rows *rows, int32_t partition, int64_t offset)
{
    size_t lo = 0, hi = rows->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        struct dl_row *r = &rows->rows[mid];
        if (r->partition < partition || (r->partition == partition && r->offset < offset))
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < rows->n && rows->rows[lo].partition == partition && rows->rows[lo].offset == offset)
        return &rows->rows[lo];
    return NULL;
}

/* ---- list ---- */

struct list_ctx {
    struct dl_rows rows;
    json_object *items;
    size_t limit;
    size_t count;
};

static json_object *int_or_null(const char *s)
{
    if (!*s) return NULL;
    char *end;
    long long v = strtoll(s, &end, 10);
    return *end ? json_object_new_string(s) : json_object_new_int64(v);
}

static void list_visit(void *ud, const rd_kafka_message_t *m)
{
    struct list_ctx *ctx = ud;
    ctx->count++;
    if (json_object_array_length(ctx->items) >= ctx->limit) return;

    char buf[1024];
    json_object *o = json_object_new_object();
    rd_kafka_timestamp_type_t tstype;
    json_object_object_add(o, "dlq_partition", json_object_new_int(m->partition));
    json_object_object_add(o, "dlq_offset", json_object_new_int64(m->offset));
    json_object_object_add(o, "timestamp",
                           json_object_new_int64(rd_kafka_message_timestamp(m, &tstype)));
    json_object_object_add(o, "key", m->key ? safe_string(m->key, m->key_len) : NULL);
    bool has_id = admin_header(m, CE_ID, buf, sizeof buf);
    json_object_object_add(o, "event_id", has_id ? json_object_new_string(buf) : NULL);
    static const struct {
        const char *header, *field;
        bool numeric;
    } fields[] = {
        {DLQ_H_ORIGINAL_TOPIC, "original_topic", false},
        {DLQ_H_ORIGINAL_PARTITION, "original_partition", true},
        {DLQ_H_ORIGINAL_OFFSET, "original_offset", true},
        {DLQ_H_ORIGINAL_TIMESTAMP, "original_timestamp", true},
        {DLQ_H_CONSUMER_GROUP, "consumer_group", false},
        {DLQ_H_ATTEMPTS, "attempts", true},
        {DLQ_H_ERROR_CLASS, "error_class", false},
        {DLQ_H_ERROR_MESSAGE, "error_message", false},
    };
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
        json_object *v = NULL;
        if (admin_header(m, fields[i].header, buf, sizeof buf))
            v = fields[i].numeric ? int_or_null(buf) : safe_string(buf, strlen(buf));
        json_object_object_add(o, fields[i].field, v);
    }
    struct dl_row *r = find_row(&ctx->rows, m->partition, m->offset);
    json_object_object_add(o, "replayed", json_object_new_boolean(r && r->replayed));
    json_object_object_add(o, "replayed_at",
                           r && r->replayed ? json_object_new_string(r->replayed_at) : NULL);
    json_object_object_add(o, "dead_lettered_at",
                           r ? json_object_new_string(r->dead_lettered_at) : NULL);
    size_t shown = m->len > DLQ_VALUE_SHOWN_MAX ? DLQ_VALUE_SHOWN_MAX : m->len;
    json_object_object_add(o, "value", m->payload ? safe_string(m->payload, shown) : NULL);
    if (shown < m->len) json_object_object_add(o, "value_truncated", json_object_new_boolean(1));
    json_object_array_add(ctx->items, o);
}

int dlq_list(const struct cfg *cfg, const char *brokers, size_t limit, json_object **out,
             char *err, size_t errlen)
{
    struct list_ctx ctx = {.limit = limit};
    PGconn *db = admin_pg_connect(cfg, "ticketd-dlq", err, errlen);
    if (!db) return -1;
    int rc = load_rows(db, &ctx.rows, err, errlen);
    PQfinish(db);
    if (rc != 0) return -1;
    ctx.items = json_object_new_array();
    rc = read_dlq(cfg, brokers, list_visit, &ctx, err, errlen);
    free(ctx.rows.rows);
    if (rc != 0) {
        json_object_put(ctx.items);
        return -1;
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "count", json_object_new_int64((int64_t)ctx.count));
    json_object_object_add(o, "truncated", json_object_new_boolean(ctx.count > limit));
    json_object_object_add(o, "dead_letters", ctx.items);
    *out = o;
    return 0;
}

/* ---- replay ---- */

enum rec_state { REC_PENDING, REC_DELIVERED, REC_FAILED };

struct replay_rec {
    struct replay_rec *next;
    struct replay_rec *primary;  /* a second dead letter of an event replayed in this run */
    enum rec_state state;
    int32_t dlq_partition;
    int64_t dlq_offset;
    bool has_row;
    char event_id[UUID_STR_LEN + 1];
    char src_topic[256];
    char src_partition[16], src_offset[24], attempts[16];
    char error_class[64];
    char error_message[DLQ_HEADER_VALUE_MAX];
};

struct replay_ctx {
    const struct cfg *cfg;
    const char *event_id;       /* filter, or NULL */
    struct dl_rows rows;
    rd_kafka_t *producer;
    struct replay_rec *recs;
    long skipped;
    long failed;
    char err[256];
};

static struct replay_rec *find_replayed(struct replay_ctx *ctx, const char *event_id)
{
    for (struct replay_rec *r = ctx->recs; r; r = r->next)
        if (!r->primary && strcmp(r->event_id, event_id) == 0) return r;
    return NULL;
}

static void replay_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    struct replay_rec *r = m->_private;
    if (!r) return;
    r->state = m->err ? REC_FAILED : REC_DELIVERED;
    if (m->err)
        log_error("dlq", "event=replay_delivery_failed dlq_partition=%" PRId32
                  " dlq_offset=%" PRId64 " err=\"%s\"", r->dlq_partition, r->dlq_offset,
                  rd_kafka_err2str(m->err));
}

/* Produces m's key and value with headers h to r's source topic at partition, waiting while
 * the producer's queue is full. On success the producer owns h. */
static rd_kafka_resp_err_t produce_copy(rd_kafka_t *producer, struct replay_rec *r,
                                        const rd_kafka_message_t *m, rd_kafka_headers_t *h,
                                        int32_t partition)
{
    for (;;) {
        rd_kafka_resp_err_t e = rd_kafka_producev(
            producer, RD_KAFKA_V_TOPIC(r->src_topic), RD_KAFKA_V_PARTITION(partition),
            RD_KAFKA_V_KEY(m->key, m->key_len), RD_KAFKA_V_VALUE(m->payload, m->len),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_OPAQUE(r),
            RD_KAFKA_V_END);
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) return e;
        rd_kafka_poll(producer, 100);
    }
}

static void replay_visit(void *ud, const rd_kafka_message_t *m)
{
    struct replay_ctx *ctx = ud;
    char ce_id[128];
    bool has_id = admin_header(m, CE_ID, ce_id, sizeof ce_id);

    if (ctx->event_id && (!has_id || strcasecmp(ce_id, ctx->event_id) != 0)) return;

    struct dl_row *row = find_row(&ctx->rows, m->partition, m->offset);
    if (row && row->replayed) {
        ctx->skipped++;
        return;
    }
    struct replay_rec *r = calloc(1, sizeof *r);
    if (!r) {
        ctx->failed++;
        return;
    }
    r->dlq_partition = m->partition;
    r->dlq_offset = m->offset;
    r->has_row = row != NULL;
    if (has_id && effects_is_uuid(ce_id, strlen(ce_id)))
        memcpy(r->event_id, ce_id, UUID_STR_LEN + 1);
    if (!admin_header(m, DLQ_H_ORIGINAL_TOPIC, r->src_topic, sizeof r->src_topic) ||
        !r->src_topic[0])
        snprintf(r->src_topic, sizeof r->src_topic, "%s", ctx->cfg->topic);
    if (!admin_header(m, DLQ_H_ORIGINAL_PARTITION, r->src_partition, sizeof r->src_partition))
        snprintf(r->src_partition, sizeof r->src_partition, "-1");
    if (!admin_header(m, DLQ_H_ORIGINAL_OFFSET, r->src_offset, sizeof r->src_offset))
        snprintf(r->src_offset, sizeof r->src_offset, "-1");
    if (!admin_header(m, DLQ_H_ATTEMPTS, r->attempts, sizeof r->attempts))
        snprintf(r->attempts, sizeof r->attempts, "0");
    admin_header(m, DLQ_H_ERROR_CLASS, r->error_class, sizeof r->error_class);
    admin_header(m, DLQ_H_ERROR_MESSAGE, r->error_message, sizeof r->error_message);

    if (strcmp(r->error_class, "unparseable") == 0 || !r->event_id[0]) {
        /* handling it again cannot succeed */
        free(r);
        ctx->skipped++;
        return;
    }
    struct replay_rec *first = find_replayed(ctx, r->event_id);
    r->next = ctx->recs;
    ctx->recs = r;
    if (first) {
        r->primary = first; /* marked replayed with it, not produced twice */
        ctx->skipped++;
        return;
    }

    rd_kafka_headers_t *orig = NULL, *h;
    h = rd_kafka_message_headers(m, &orig) == RD_KAFKA_RESP_ERR_NO_ERROR && orig
            ? rd_kafka_headers_copy(orig)
            : rd_kafka_headers_new(4);
    for (size_t i = 0; i < DLQ_HEADER_COUNT; i++)
        rd_kafka_header_remove(h, dlq_header_names[i]);
    char *end;
    long part = strtol(r->src_partition, &end, 10);
    int32_t partition = (*end || part < 0) ? RD_KAFKA_PARTITION_UA : (int32_t)part;
    rd_kafka_resp_err_t e = produce_copy(ctx->producer, r, m, h, partition);
    if (e == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION && partition != RD_KAFKA_PARTITION_UA)
        e = produce_copy(ctx->producer, r, m, h, RD_KAFKA_PARTITION_UA);
    if (e) {
        rd_kafka_headers_destroy(h);
        r->state = REC_FAILED;
        log_error("dlq", "event=replay_produce_failed event_id=%s err=\"%s\"", r->event_id,
                  rd_kafka_err2str(e));
    }
    rd_kafka_poll(ctx->producer, 0);
}

static const char mark_sql[] =
    "UPDATE dead_letters SET replayed_at = now() WHERE dlq_partition = $1::int"
    " AND dlq_offset = $2::bigint AND replayed_at IS NULL";
static const char insert_sql[] =
    "INSERT INTO dead_letters (event_id, src_topic, src_partition, src_offset, dlq_partition,"
    " dlq_offset, attempts, error_class, error_message, replayed_at)"
    " SELECT $3::uuid, $4, $5::int, $6::bigint, $1::int, $2::bigint, $7::int, $8, $9, now()"
    " WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE dlq_partition = $1::int"
    " AND dlq_offset = $2::bigint)";

static int mark_replayed(PGconn *db, const struct replay_rec *r)
{
    char qb[600];
    char part[16], off[24];
    snprintf(part, sizeof part, "%" PRId32, r->dlq_partition);
    snprintf(off, sizeof off, "%" PRId64, r->dlq_offset);
    PGresult *res;
    if (r->has_row) {
        const char *p[2] = {part, off};
        res = PQexecParams(db, mark_sql, 2, NULL, p, NULL, NULL, 0);
    } else {
        char msg[sizeof r->error_message];
        snprintf(msg, sizeof msg, "%s", r->error_message);
        for (char *s = msg; *s; s++)
            if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) *s = '?';
        const char *p[9] = {part, off, r->event_id, r->src_topic, r->src_partition,
                            r->src_offset, r->attempts,
                            r->error_class[0] ? r->error_class : "unknown", msg};
        res = PQexecParams(db, insert_sql, 9, NULL, p, NULL, NULL, 0);
    }
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK ? 0 : -1;
    if (rc != 0)
        log_error("dlq", "event=mark_replayed_failed dlq_partition=%" PRId32 " dlq_offset=%" PRId64
                  " err=%s", r->dlq_partition, r->dlq_offset,
                  log_quoted(PQresultErrorMessage(res), qb, sizeof qb));
    PQclear(res);
    return rc;
}

int dlq_replay(const struct cfg *cfg, const char *brokers, const char *event_id,
               json_object **out, char *err, size_t errlen)
{
    struct replay_ctx ctx = {.cfg = cfg, .event_id = event_id};
    int rc = -1;
    PGconn *db = admin_pg_connect(cfg, "ticketd-dlq", err, errlen);
    if (!db) return -1;
    if (load_rows(db, &ctx.rows, err, errlen) != 0) goto out;

    rd_kafka_conf_t *conf = kafka_conf_new(brokers, cfg->kafka_config, err, errlen);
    if (!conf) goto out;
    char e2[256];
    if (rd_kafka_conf_set(conf, "acks", "all", e2, sizeof e2) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(conf, "enable.idempotence", "true", e2, sizeof e2) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(conf, "client.id", "ticketd-dlq-replay", e2, sizeof e2) !=
            RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "producer configuration: %s", e2);
        rd_kafka_conf_destroy(conf);
        goto out;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, replay_dr);
    kafka_conf_log_to_ours(conf);
    ctx.producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, errlen);
    if (!ctx.producer) {
        rd_kafka_conf_destroy(conf);
        goto out;
    }
    if (read_dlq(cfg, brokers, replay_visit, &ctx, err, errlen) != 0) goto out;
    rd_kafka_flush(ctx.producer, DLQ_FLUSH_TIMEOUT_MS);

    long replayed = 0;
    for (struct replay_rec *r = ctx.recs; r; r = r->next) {
        enum rec_state st = r->primary ? r->primary->state : r->state;
        if (st != REC_DELIVERED) {
            if (!r->primary) ctx.failed++;
            continue;
        }
        if (mark_replayed(db, r) != 0 && !r->primary) {
            /* produced again, so it will be handled; only the mark is missing */
            log_warn("dlq", "event=replayed_unmarked event_id=%s", r->event_id);
        }
        if (!r->primary) {
            replayed++;
            log_info("dlq", "event=replayed event_id=%s dlq_partition=%" PRId32
                     " dlq_offset=%" PRId64 " topic=%s", r->event_id, r->dlq_partition,
                     r->dlq_offset, r->src_topic);
        }
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "replayed", json_object_new_int64(replayed));
    json_object_object_add(o, "skipped", json_object_new_int64(ctx.skipped));
    json_object_object_add(o, "failed", json_object_new_int64(ctx.failed));
    *out = o;
    rc = 0;
out:
    if (ctx.producer) rd_kafka_destroy(ctx.producer);
    while (ctx.recs) {
        struct replay_rec *r = ctx.recs;
        ctx.recs = r->next;
        free(r);
    }
    free(ctx.rows.rows);
    PQfinish(db);
    return rc;
}

/* ---- CLI ---- */

static int usage(void)
{
    fprintf(stderr, "usage: ticketd dlq list [--limit N] | ticketd dlq replay [--event-id E]\n");
    return 2;
}

int dlq_main(struct cfg *c, int argc, char **argv)
{
    if (argc < 1) return usage();
    const char *sub = argv[0];
    const char *event_id = NULL;
    long limit = DLQ_LIST_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *limit_arg = NULL;
        bool bad = false;
        if (!admin_take_flag(argc, argv, &i, "--event-id", &event_id, &bad) &&
            !admin_take_flag(argc, argv, &i, "--limit", &limit_arg, &bad))
            return usage();
        if (bad) return usage();
        if (limit_arg) {
            char *end;
            limit = strtol(limit_arg, &end, 10);
            if (*end || limit < 1 || limit > DLQ_LIST_MAX) return usage();
        }
    }
    if (!c->kafka_brokers || !*c->kafka_brokers) {
        fprintf(stderr, "ticketd dlq: KAFKA_BROKERS must name the cluster\n");
        return 2;
    }
    if (event_id && !effects_is_uuid(event_id, strlen(event_id))) {
        fprintf(stderr, "ticketd dlq: --event-id must be a UUID (the ce_id)\n");
        return 2;
    }
    json_object *o = NULL;
    char err[512];
    int rc;
    if (strcmp(sub, "list") == 0 && !event_id)
        rc = dlq_list(c, c->kafka_brokers, (size_t)limit, &o, err, sizeof err);
    else if (strcmp(sub, "replay") == 0)
        rc = dlq_replay(c, c->kafka_brokers, event_id, &o, err, sizeof err);
    else
        return usage();
    if (rc != 0) {
        fprintf(stderr, "ticketd dlq %s: %s\n", sub, err);
        return 1;
    }
    admin_cli_print_json(o);
    json_object_put(o);
    return 0;
}
