/* effects_batch (fxb_): the group commit of the effects, internal to effects (effects.c
 * and effects_batch.c only; callers use effects.h).
 *
 * The points step of every run that is ready (all partitions) goes out as one statement,
 * and the done marks of many runs as another, cut after each poll phase while a connection
 * is idle (under load the lists grow while the statements run, so the next batch is bigger:
 * one commit serves many). This header also holds the run and lane records both files
 * share. */
#ifndef TICKETD_EFFECTS_BATCH_H
#define TICKETD_EFFECTS_BATCH_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "effects.h"

enum effects_kind { EFFECTS_DATA_PLATFORM, EFFECTS_EMAIL };

/* Progress of one external effect (data platform, e-mail) of a run. */
struct fx_ext {
    bool want;
    bool called;          /* the call succeeded now, or the DB said done */
    bool committed;       /* its done mark committed, or the DB said done */
    int pending_tries;    /* a mark waiting to be sent: calls to add to attempts */
    bool pending_done;    /* ... and whether one of them succeeded */
    bool sent;            /* a marks statement with this effect is in flight */
    int sent_tries;
    bool sent_done;
};

/* Steps of a run held after a failure until the caller resumes it (bits). */
enum fx_hold { HOLD_POINTS = 1, HOLD_CALL = 2, HOLD_MARKS = 4 };

struct fx_lane;

/* The run's place in one of the two queues of the batches (intrusive, doubly linked). */
enum fx_queue_id { Q_READY, Q_MARKS };   /* waiting for a points statement / marks to send */
struct fx_link {
    struct effects_run *prev, *next;
    bool in;
};
struct fx_queue {
    struct effects_run *head, *tail;
    size_t n;
};

/* One event's effects, from effects_run until its outcome DONE, effects_release or
 * effects_detach; an orphan (released or detached) lives on until its done marks are
 * written, then the check handle frees it. */
struct effects_run {
    struct effects *fx;
    struct fx_lane *lane;          /* NULL for an orphan */
    struct effects_run *prev, *next; /* the lane's runs in offset order, or the orphans */
    struct fx_link link[2];        /* by enum fx_queue_id */
    struct effects_event ev;       /* ev.value is read only while the run is not an orphan */
    effects_outcome_fn cb;
    void *ud;
    bool waiting;                  /* the caller waits for this round's outcome */
    bool orphan;
    unsigned hold;                 /* enum fx_hold bits */
    bool in_points;                /* in a points statement */
    bool points_ok;                /* the points statement committed */
    bool calling;                  /* an external call in flight */
    bool claiming;                 /* the e-mail claim statement in flight */
    bool email_claimed;            /* the claim for the next e-mail attempt is ours */
    uint64_t claim_sent_at;        /* uv_now() when that claim was sent */
    int orphan_mark_tries;
    char token[UUID_STR_LEN + 1];  /* this copy's e-mail claim token ("" until needed) */
    enum effects_kind calling_kind;
    struct fx_ext ext[2];          /* by enum effects_kind */
    unsigned ops;                  /* callbacks still to come that refer to this run */
    char *last_error;              /* the last failed call's message, for its failure mark */
};

struct effects {
    uv_loop_t *loop;
    const struct cfg *cfg;
    char *group;
    struct dbp *db;
    struct hc *hc;
    int points_stmt, marks_stmt, claim_stmt; /* prepared statements, or -1 */
    unsigned inflight;             /* statements and calls in progress */
    bool draining, stopped;
    bool db_unhealthy;             /* a statement failed for the database's sake (logged once) */
    struct fx_lane **lanes;        /* by partition; NULL = none */
    int32_t nlanes;
    struct effects_run *orphans;
    struct fx_queue queue[2];      /* by enum fx_queue_id */
    int points_inflight, marks_inflight;
    uv_check_t check;              /* cuts the batches after each poll phase; reaps orphans */
    uv_idle_t idle;                /* keeps the loop from blocking while a batch can be sent */
    unsigned open_handles;
    void (*close_done)(void *ud);
    void *close_ud;
};

/* effects_batch.c */
void fxb_ready_push(struct effects_run *r);
void fxb_ready_remove(struct effects_run *r);
void fxb_marks_push(struct effects_run *r);
void fxb_marks_remove(struct effects_run *r);
/* Cuts and sends the batches while connections are idle; returns whether more could go. */
bool fxb_cut(struct effects *fx);
int fxb_prepare(struct effects *fx);
const char *fxb_kind_name(enum effects_kind k);
/* The libpq error text, one line, printable. */
struct pg_result;
void fxb_db_error(char *out, size_t n, const char *prefix, const struct pg_result *res,
                  const char *error);
void fxb_ascii_only(char *s);

/* effects.c, called back by the batches */
void fx_kick(struct effects *fx);
void fx_db_health(struct effects *fx, bool healthy, const char *error);
/* A failed step of r: held until the caller resumes; the round's outcome if it waits. */
void fx_run_fail(struct effects_run *r, unsigned hold, const char *error_class, const char *msg,
                 bool db_fault);
/* Reports DONE when every step committed. */
void fx_run_check(struct effects_run *r);
void fx_lane_pump_of(struct effects_run *r);

#endif
