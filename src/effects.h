/* effects (effects_): the three follow-ups of a TicketApplied event, end to end behind one
 * call. effects_run(event) runs them and reports exactly one outcome: done, failed (error
 * class and message: the caller retries or dead-letters) or retry (wait, not an attempt).
 * Each effect is idempotent by the event id (the CloudEvents ce_id = outbox.event_id) and
 * recorded in event_effects (done, attempts, last_error), so a retry or a replay redoes
 * only what is not done yet. Inside, the statements are batched across events (group
 * commit, like ingest; effects_batch.c): the points step of every ready event is one
 * statement, and the done marks of many external effects another.
 *
 * Order for one event (and why it is safe to crash anywhere):
 *   1. points: one PostgreSQL statement (CTEs, one implicit transaction) for many events:
 *      insert processed_events ON CONFLICT DO NOTHING; only for the rows that are new,
 *      insert the points_ledger row (points_ledger.event_id is UNIQUE too); upsert the
 *      event_effects rows of every enabled effect (points is written done; the others
 *      start not done); return, per event, whether the points were granted now and which
 *      external effects were already done. Points are therefore granted exactly once: a
 *      crash before the commit grants nothing, after it the conflict skips the grant.
 *   2. data_platform: POST the CloudEvent (structured mode JSON) to DATA_PLATFORM_URL with
 *      "Idempotency-Key: <event id>"; 2xx = success; then its done mark must commit.
 *   3. email: claim the event's email row (one sender per event at a time, see below), then
 *      send with Message-ID <event-id@ticketd>; then its done mark.
 *   The external calls of one partition (lane) run one event at a time, in the order of
 *   effects_run (offset order), retries included; a run whose step failed holds back the
 *   later calls of its partition (not their points) until it is resumed or released.
 *   DONE is reported only after every enabled effect's done mark committed; the caller
 *   commits the Kafka offset only after that. A crash at any point therefore leaves the
 *   offset uncommitted and the event is re-delivered; done effects are skipped; a
 *   data-platform POST that happened but whose done mark did not commit is sent again with
 *   the same Idempotency-Key (deduplicated by the receiver).
 *   E-mail (SMTP does not deduplicate by Message-ID): before each attempt the run claims the
 *   row for a token of this copy of the event until now + 2 x SINK_TIMEOUT + 10 s
 *   (PostgreSQL's clock), unless it is done or claimed by another token whose claim has not
 *   expired (then: outcome RETRY, and the copy waits for that claim's done mark or expiry).
 *   So re-sent copies and the old and new owners of a rebalanced partition send one mail.
 *   THE ONLY AT-LEAST-ONCE CASE: the process dies (or loses the SMTP reply, or cannot write
 *   the done mark before its claim expires) after the SMTP server accepted the message and
 *   before the done mark committed; the next owner re-sends after the claim expires.
 *   Points first: they are local, transactional and the cheapest to make exactly-once;
 *   the external calls follow, in a fixed order so a failing SMTP server never re-posts
 *   to the data platform (its row is already done). Done marks of calls that happened are
 *   written even for runs released or detached meanwhile (a dropped one would make the
 *   next owner mail again once the claim expired).
 *
 * Disabled effects (DATA_PLATFORM_URL or SMTP_URL empty, or no e-mail address) get no
 * event_effects row. So an event is fully handled when its processed_events row exists and
 * none of its event_effects rows has done = false.
 *
 * Failures: a failed external call is recorded as a mark with done = false (attempts + 1,
 * last_error); the caller decides whether to resume or to dead-letter. Marks never turn a
 * done row back to not done. The `points` row's attempts counts the statements that found
 * it undone (1). */
#ifndef TICKETD_EFFECTS_H
#define TICKETD_EFFECTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "limits.h"

struct dbp;
struct hc;
struct effects;

/* A parsed TicketApplied event. The strings are copies; value points into the message,
 * which the caller keeps alive while the run is its own (see effects_run). */
struct effects_event {
    char event_id[UUID_STR_LEN + 1];           /* ce_id header, a UUID */
    char ce_time[64];                          /* ce_time header ("" if absent) */
    int64_t application_id;                    /* value.id */
    char ticket_event[EVENT_ID_MAX_CHARS + 1]; /* value.event_id */
    char phone[PHONE_DIGITS_MAX + 1];          /* value.phone, digits */
    char email[EMAIL_MAX_BYTES + 1];           /* "" when none */
    const char *value;                         /* the message value (JSON) */
    size_t value_len;
    /* where it was read from (processed_events columns) */
    const char *topic;
    int32_t partition;
    int64_t offset;
};

/* Parses the message value and ce_id header. Returns 0, or -1 with why in err (the event
 * is poison: dead-letter it at once). ce_id may be NULL (missing header). */
int effects_parse(const char *ce_id, size_t ce_id_len, const char *ce_time, size_t ce_time_len,
                  const char *value, size_t value_len, struct effects_event *out, char *err,
                  size_t errlen);

/* A UUID in its canonical 8-4-4-4-12 hex form. */
bool effects_is_uuid(const char *s, size_t len);

/* The outcome of one round of a run (effects_run or effects_resume). */
enum effects_status {
    EFFECTS_DONE,   /* every enabled effect done and recorded; the run is gone */
    EFFECTS_FAILED, /* a step failed: resume it (from that step) or release it */
    EFFECTS_RETRY,  /* another copy holds the e-mail claim: resume after a wait (not an
                     * attempt of the event) */
};
struct effects_outcome {
    enum effects_status status;
    /* FAILED: "db" (a query error), "db_unavailable", "sink_status", "sink_transport",
     * "smtp" or "closing" (the short class for the DLQ header); printable ASCII message */
    const char *error_class;
    const char *error_message;
    bool db_fault;  /* FAILED: our own database is unhealthy (dbp_error_is_ours, or not
                     * connected), not the event: wait without using an attempt */
};
typedef void (*effects_outcome_fn)(void *ud, const struct effects_outcome *o);

struct effects_run;

/* Runs ev's effects (its strings are copied; ev->value must stay valid until the outcome
 * DONE, effects_release or effects_detach). *out is the run's handle until then. cb runs
 * exactly once per round, never from inside this call (nor effects_resume). Returns 0, or
 * -errno (-ECANCELED while draining; cb not called). */
int effects_run(struct effects *fx, const struct effects_event *ev, effects_outcome_fn cb,
                void *ud, struct effects_run **out);

/* After FAILED or RETRY: a new round from the steps that did not succeed (one more
 * outcome). Returns 0 or -errno (cb not called). */
int effects_resume(struct effects *fx, struct effects_run *r);

/* The caller is done with r (it dead-lettered the event): no callback any more; calls in
 * flight finish and their marks are written; r's partition lane moves on. */
void effects_release(struct effects *fx, struct effects_run *r);

/* The partition was revoked: no callback arrives for its runs any more and their handles
 * are invalid. What is in flight finishes; done marks of calls that happened are still
 * written (a few statements at most); nothing else is. */
void effects_detach(struct effects *fx, int32_t partition);

/* db and hc are borrowed (owned by the caller, outlive the effects). consumer_group names
 * the group in processed_events. */
int effects_create(struct effects **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *consumer_group, struct dbp *db, struct hc *hc);

/* Shutdown, step 1: no new points statement, claim or call starts (effects_run and
 * effects_resume return -ECANCELED); done marks still go out. */
void effects_drain(struct effects *fx);

/* Shutdown, step 2: nothing new starts (the calls' start returns -ECANCELED, failed with
 * "closing"). Call before closing the hc. */
void effects_stop(struct effects *fx);

/* Statements and calls in progress, plus runs whose marks wait to be sent. */
unsigned effects_inflight(const struct effects *fx);

/* Stops, then frees fx and every run on a later loop turn (its libuv handles close), then
 * calls done(ud). Everything in progress must have finished (close hc and db first: their
 * callbacks run with the closing errors). */
void effects_close(struct effects *fx, void (*done)(void *ud), void *ud);

#endif
