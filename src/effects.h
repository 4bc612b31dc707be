/* effects (effects_): the three follow-ups of one TicketApplied event, each idempotent by
 * the event id (the CloudEvents ce_id = outbox.event_id), each recorded in event_effects
 * (done, attempts, last_error) so a retry or a replay redoes only what is not done yet.
 *
 * Order of one run (and why it is safe to crash anywhere):
 *   1. One PostgreSQL statement (CTEs, one implicit transaction): insert processed_events
 *      ON CONFLICT DO NOTHING; only when that row is new, insert the points_ledger row
 *      (points_ledger.event_id is UNIQUE too); upsert the event_effects rows of every enabled
 *      effect (points is written done; the others start not done); return which of the
 *      external effects were already done. Points are therefore granted exactly once: a
 *      crash before the commit grants nothing, after it the conflict skips the grant.
 *   2. data_platform: POST the CloudEvent (structured mode JSON) to DATA_PLATFORM_URL with
 *      "Idempotency-Key: <event id>"; 2xx = success; then mark the row done (waited for).
 *   3. email: Message-ID <event-id@ticketd>; then mark the row done (waited for).
 *   The run reports success only after every enabled effect's done mark committed, and the
 *   consumer commits the Kafka offset only after that. A crash at any point therefore leaves
 *   the offset uncommitted and the event is re-delivered; done effects are skipped; an
 *   external effect that happened but whose done mark did not commit is sent again with the
 *   same Idempotency-Key / Message-ID (at-least-once, deduplicated by the receiver).
 *   Points first: they are local, transactional and the cheapest to make exactly-once;
 *   the external calls follow, in a fixed order so a failing SMTP server never re-posts
 *   to the data platform (its row is already done).
 *
 * Disabled effects (DATA_PLATFORM_URL or SMTP_URL empty, or no e-mail address) get no
 * event_effects row. So an event is fully handled when its processed_events row exists and
 * none of its event_effects rows has done = false.
 *
 * Failures: the run stops at the first failing effect (recording attempts + 1 and
 * last_error on its row) and reports it; the consumer decides whether to retry or to
 * dead-letter. The `points` row's attempts counts the runs that found it undone (1). */
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
 * which the caller keeps alive until the run's callback. */
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

/* Outcome of one run. error_class: NULL on success, else one of "db", "sink_status",
 * "sink_transport", "smtp", "closing" (the short class for the DLQ header). */
struct effects_outcome {
    bool ok;
    const char *error_class;
    const char *error_message;
    bool points_granted;        /* this run inserted the points_ledger row */
};
typedef void (*effects_done_fn)(void *ud, const struct effects_outcome *out);

/* db and hc are borrowed (owned by the caller, outlive the effects). consumer_group names
 * the group in processed_events. */
int effects_create(struct effects **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *consumer_group, struct dbp *db, struct hc *hc);

/* Starts a run for ev (copied, except ev->value and ev->topic which must stay valid until
 * cb). cb runs exactly once on a later loop turn. Returns 0, or -errno (cb not called). */
int effects_run(struct effects *fx, const struct effects_event *ev, effects_done_fn cb,
                void *ud);

/* Shutdown, step 1: runs in progress start no new external request (they finish with error
 * class "closing" at their next step). Call before closing the hc. */
void effects_stop(struct effects *fx);

/* Runs in progress. */
unsigned effects_inflight(const struct effects *fx);

/* Frees fx. Runs still in progress must have finished (their callbacks run with the pool /
 * client closing errors first: close hc and db after this only when effects_inflight is 0). */
void effects_free(struct effects *fx);

#endif
