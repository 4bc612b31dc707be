/* consumer_int: the records the consumer's files share (consumer.c: partitions, windows,
 * retries, the DLQ hand-off, rebalance, start; consumer_offsets.c: commits, offset resets,
 * lag; consumer_close.c: the shutdown sequence). Internal: callers use consumer.h. */
#ifndef TICKETD_CONSUMER_INT_H
#define TICKETD_CONSUMER_INT_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "dlq_writer.h"
#include "effects.h"

/* What a slot in backoff retries when its timer is due (bits: several can be pending). */
enum retry_what {
    RETRY_RUN = 1,     /* the effects: effects_run, or effects_resume from the failed step */
    RETRY_DLQ = 2,     /* the DLQ produce, or the dead_letters insert once acknowledged */
};

enum dlq_state { DLQ_NONE, DLQ_WRITING, DLQ_WAIT, DLQ_DONE };

/* One fetched event, from its fetch until its offset may be committed. */
struct slot {
    struct cpart *p;
    struct slot *next;          /* partition list, offset order */
    rd_kafka_message_t *m;
    struct effects_event ev;
    struct effects_run *run;    /* while effects_run has it (NULL: not started, or over) */
    bool effects_done;          /* its effects reported EFFECTS_DONE */
    bool active;                /* in the window: parsed and handed out */
    bool poison;
    unsigned retry;             /* enum retry_what bits while in backoff */
    uint64_t retry_at;          /* uv_now() */
    int fails;                  /* failed attempts (the DLQ's dlq_attempts) */
    int db_waits;               /* consecutive waits for our own database (not attempts) */
    enum dlq_state dlq;
    bool finished;              /* handled or dead-lettered: its offset may be committed */
    unsigned ops;               /* callbacks still to come that refer to this slot */
    struct dlq_letter letter;    /* while dead-lettering */
    char err_class[32];
    char *err_msg;              /* the last failure (DLQ_MESSAGE_MAX), allocated on demand */
};

struct cpart {
    struct consumer *c;
    int32_t partition;
    bool assigned;              /* false once revoked: a zombie until busy is 0 */
    struct cpart *next_zombie;
    struct slot *head, *tail;   /* fetched and not finished-and-released, in offset order */
    struct slot *next_inactive; /* the first slot outside the window */
    size_t nslots, nactive;
    unsigned nbackoff;          /* slots waiting for a retry */
    unsigned busy;              /* DLQ writer callbacks still to come for its slots */
    bool paused;
    uv_timer_t timer;           /* the earliest retry of its slots */
    int64_t last_seen;          /* offset of the last message queued */
    int64_t next_commit;        /* last finished offset + 1; -1 = none yet */
    int64_t commit_sent;        /* handed to rd_kafka_commit */
    int64_t commit_acked;       /* acknowledged by the coordinator */
};

enum phase { PH_RUNNING, PH_DRAINING, PH_STOPPING_IO, PH_KAFKA_CLOSING, PH_DESTROYING, PH_DONE };

struct consumer {
    uv_loop_t *loop;
    const struct cfg *cfg;
    rd_kafka_t *rk;             /* group consumer */
    struct dlq_writer *dlq;
    rd_kafka_queue_t *cq, *close_q;
    struct kafka_bridge *cbridge, *close_bridge;
    struct dbp *db;
    struct hc *hc;
    struct effects *fx;
    struct cpart **parts;       /* by partition number; NULL = not assigned */
    int32_t nparts;
    struct cpart *zombies;
    size_t inhand;              /* slots in all partitions */
    bool flow_paused;           /* inhand passed INHAND_HIGH and not yet below INHAND_LOW */
    uv_timer_t commit_timer, poll_timer, close_timer;
    bool commit_scheduled;
    int commit_failures;        /* consecutive failed commits: the retry interval doubles */
    unsigned open_handles;
    bool ready;
    enum phase phase;
    uint64_t rng;
    uv_work_t destroy_work;
    void (*close_done)(void *ud);
    void *close_ud;
};

/* consumer.c */
struct cpart *cons_part_get(struct consumer *c, int32_t partition);
rd_kafka_topic_partition_list_t *cons_one_partition(struct consumer *c, int32_t partition,
                                                    int64_t offset);
void cons_set_paused(struct cpart *p, bool want);
void cons_part_drop_slots(struct cpart *p);
void cons_part_free(struct cpart *p);
void cons_rebalance(struct consumer *c, rd_kafka_resp_err_t err,
                    rd_kafka_topic_partition_list_t *partitions);
void cons_handle_closed(uv_handle_t *h);

/* consumer_offsets.c */
void cons_commit_now(struct consumer *c);
void cons_schedule_commit(struct consumer *c);
void cons_commit_result(struct consumer *c, rd_kafka_resp_err_t err,
                        const rd_kafka_topic_partition_list_t *offsets);
void cons_offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                           rd_kafka_topic_partition_list_t *offsets, void *opaque);
void cons_offset_reset(struct consumer *c, rd_kafka_message_t *m);
void cons_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf);
void cons_lag_watch(struct consumer *c);
void cons_lag_unwatch(struct consumer *c);

/* consumer_close.c */
void cons_close_progress(struct consumer *c);

#endif
