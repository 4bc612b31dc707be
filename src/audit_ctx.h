/* audit_ctx: the state of one audit run (audit.c), shared with its rendering
 * (audit_render.c). Internal to the audit: nothing else includes it. */
#ifndef TICKETD_AUDIT_CTX_H
#define TICKETD_AUDIT_CTX_H

#include <json-c/json.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "audit.h"
#include "config.h"
#include "limits.h"

/* One kind of finding: an exact count and the first AUDIT_LIST_MAX items. */
struct cat {
    const char *key;     /* JSON name */
    const char *title;   /* human report */
    bool missing;        /* counts toward the verdict */
    int64_t count;
    json_object *items;
};

enum {
    C_WITHOUT_OUTBOX,        /* stage 1 */
    C_OUTBOX_ORPHAN,
    C_PRUNED_UNACCOUNTED,
    C_UNPUBLISHED,           /* stage 2 */
    C_NOT_IN_TOPIC,
    C_WRONG_OFFSET,
    C_TOPIC_ORPHAN,
    C_RECORDED_ELSEWHERE,
    C_EXPIRED,
    C_EXPIRED_UNCONSUMED,
    C_UNHANDLED,             /* stage 3 */
    C_NOT_CONSUMED,
    C_EFFECTS_OPEN,
    C_DEAD_LETTERED,
    C_COUNT
};

struct part_stat {
    int64_t low, high, committed;
    int64_t rows, verified, expired, messages;
};

/* A message no row matched at its position, waiting for its lookup by ce_id. */
struct cand {
    int32_t partition;
    int64_t offset;
    int64_t ts;
    char key[40];
    char ce_id[UUID_STR_LEN + 1];
};

/* An event below the committed offset the DB does not account for; the DLQ topic may. */
struct unhandled {
    char ce_id[UUID_STR_LEN + 1];
    int64_t app_id;
    int32_t partition;
    int64_t offset;
    int64_t committed;
    bool in_dlq_topic;
};

/* Distinct application ids named missing (one application may fail at two stages: a deleted
 * outbox row also leaves its message without a row). Open addressing; past
 * AUDIT_DISTINCT_MAX ids it stops deduplicating rather than grow further. */
struct idset {
    int64_t *slots;  /* 0 = empty; ids are stored + 1 so id 0 is representable */
    size_t cap, n;
    bool full;
};

struct audit_ctx {
    const struct cfg *cfg;
    const struct audit_opts *opts;
    char *err;
    size_t errlen;

    PGconn *db;        /* the snapshot (REPEATABLE READ) */
    PGconn *lookup;    /* autocommit: sees rows committed after the snapshot */
    rd_kafka_t *rk;    /* reader (assign only) */

    struct cat cats[C_COUNT];
    json_object *missing_ids;   /* verdict list of distinct ids, capped */
    int64_t missing;            /* distinct application ids (or keys) with a finding */
    struct idset distinct;

    int64_t applications, outbox_rows, outbox_published, in_grace;
    int64_t pruned;             /* older than OUTBOX_RETENTION, outbox row gone (not provable) */
    int64_t processed, outside_scope;
    int64_t pending;            /* not consumed yet, published within AUDIT_GRACE */
    int64_t since_ms;           /* -1 = no --since */

    int nparts;
    struct part_stat *parts;

    struct cand cands[AUDIT_LOOKUP_BATCH];
    int ncands;

    struct unhandled *unh;
    size_t nunh, capunh;
    int64_t unh_unchecked;      /* beyond AUDIT_DLQ_CHECK_MAX: not looked for in the DLQ topic */
};

/* Applications not through yet but within AUDIT_GRACE: not missing, not complete. */
int64_t audit_in_flight(const struct audit_ctx *a);

/* The report of a finished run: JSON (the caller owns it) or the human text. */
json_object *audit_report_json(const struct audit_ctx *a);
void audit_report_human(const struct audit_ctx *a, FILE *out);

#endif
