/* effects (effects_): the three follow-ups of a TicketApplied event, each idempotent by
 * the event id (the CloudEvents ce_id = outbox.event_id), each recorded in event_effects
 * (done, attempts, last_error) so a retry or a replay redoes only what is not done yet.
 * The steps are offered in batches (group commit, like ingest): the consumer sends the
 * points step of every event that is ready in one statement, and the done marks of many
 * external effects in one statement.
 *
 * Order for one event (and why it is safe to crash anywhere):
 *   1. effects_points_batch: one PostgreSQL statement (CTEs, one implicit transaction) for
 *      many events: insert processed_events ON CONFLICT DO NOTHING; only for the rows that
 *      are new, insert the points_ledger row (points_ledger.event_id is UNIQUE too); upsert
 *      the event_effects rows of every enabled effect (points is written done; the others
 *      start not done); return, per event, whether the points were granted now and which
 *      external effects were already done. Points are therefore granted exactly once: a
 *      crash before the commit grants nothing, after it the conflict skips the grant.
 *   2. data_platform (effects_call): POST the CloudEvent (structured mode JSON) to
 *      DATA_PLATFORM_URL with "Idempotency-Key: <event id>"; 2xx = success; then its done
 *      mark (effects_mark_batch) must commit.
 *   3. email: effects_claim_email (one sender per event at a time, see below), then
 *      effects_call with Message-ID <event-id@ticketd>; then its done mark.
 *   The consumer treats an event as handled only after every enabled effect's done mark
 *   committed, and commits the Kafka offset only after that. A crash at any point therefore
 *   leaves the offset uncommitted and the event is re-delivered; done effects are skipped;
 *   a data-platform POST that happened but whose done mark did not commit is sent again
 *   with the same Idempotency-Key (deduplicated by the receiver).
 *   E-mail (SMTP does not deduplicate by Message-ID): a copy of the event that finds the
 *   row claimed by another copy waits for that claim's done mark or expiry, so re-sent
 *   copies and the old and new owners of a rebalanced partition send one mail. THE ONLY
 *   AT-LEAST-ONCE CASE: the process dies (or loses the SMTP reply, or cannot write the done
 *   mark before its claim expires) after the SMTP server accepted the message and before
 *   the done mark committed; the next owner re-sends after the claim expires.
 *   Points first: they are local, transactional and the cheapest to make exactly-once;
 *   the external calls follow, in a fixed order so a failing SMTP server never re-posts
 *   to the data platform (its row is already done).
 *
 * Disabled effects (DATA_PLATFORM_URL or SMTP_URL empty, or no e-mail address) get no
 * event_effects row. So an event is fully handled when its processed_events row exists and
 * none of its event_effects rows has done = false.
 *
 * Failures: a failed external call is recorded as a mark with done = false (attempts + 1,
 * last_error); the consumer decides whether to retry or to dead-letter. Marks never turn a
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

/* Whether an event gets the external effects (their settings are non-empty; e-mail needs
 * an address too). */
bool effects_wants_data_platform(const struct effects *fx);
bool effects_wants_email(const struct effects *fx, const struct effects_event *ev);

/* Step 1 for n events (n >= 1; the same event id may appear twice). On success res holds n
 * entries in the order of evs; on failure res is NULL and error says why (no effect of the
 * statement committed). */
struct effects_points_result {
    bool points_granted;        /* this statement inserted the points_ledger row */
    bool data_platform_done;    /* done before this statement */
    bool email_done;
};
/* db_fault (on failure): the database is unhealthy (dbp_error_is_ours), not the events. */
typedef void (*effects_points_fn)(void *ud, const struct effects_points_result *res,
                                  const char *error, bool db_fault);

/* evs are read during the call only. cb runs exactly once on a later loop turn. Returns 0,
 * or -errno (-ENOTCONN: database unavailable; cb not called). */
int effects_points_batch(struct effects *fx, const struct effects_event *const *evs, size_t n,
                         effects_points_fn cb, void *ud);

enum effects_kind { EFFECTS_DATA_PLATFORM, EFFECTS_EMAIL };

/* Outcome of one external call. error_class: NULL on success, else "sink_status",
 * "sink_transport", "smtp" or "closing" (the short class for the DLQ header); the message is
 * printable ASCII. Failures are counted (ticketd_sink_failures_total) and logged here. */
struct effects_call_result {
    bool ok;
    const char *error_class;
    const char *error_message;
};
typedef void (*effects_call_fn)(void *ud, const struct effects_call_result *res);

/* Steps 2 and 3 (the e-mail after effects_claim_email): the data-platform POST or the e-mail of ev (read during the call only).
 * cb runs exactly once on a later loop turn. Returns 0, or -errno (-ECANCELED after
 * effects_stop; cb not called). */
int effects_call(struct effects *fx, enum effects_kind kind, const struct effects_event *ev,
                 effects_call_fn cb, void *ud);

/* One mark: `tries` attempts of (event, effect) to add, done or failed with error. */
struct effects_mark {
    const char *event_id;
    enum effects_kind effect;
    bool done;
    int tries;
    const char *error;          /* NULL when done */
};
/* ok: the statement committed (every mark is written); else db_fault as above. */
typedef void (*effects_marks_fn)(void *ud, bool ok, const char *error, bool db_fault);

/* Writes n marks (n >= 1) in one statement; marks are read during the call only. Several
 * marks of one (event, effect) fold into one (done wins, tries add up). cb runs exactly once
 * on a later loop turn. Returns 0, or -errno (cb not called). */
int effects_mark_batch(struct effects *fx, const struct effects_mark *marks, size_t n,
                       effects_marks_fn cb, void *ud);

/* Before each e-mail attempt: claims the event's email row for `token` (a UUID the caller
 * keeps for its attempts of this copy of the event) until now + ttl_ms (PostgreSQL's clock),
 * unless the row is done or claimed by another token whose claim has not expired. So two
 * copies of one event (a relay re-send, the old and the new owner after a rebalance) never
 * send at the same time, and the second finds the first's done mark. */
enum effects_claim { EFFECTS_CLAIMED, EFFECTS_CLAIM_DONE, EFFECTS_CLAIM_HELD };
typedef void (*effects_claim_fn)(void *ud, enum effects_claim result, const char *error,
                                 bool db_fault);
/* cb runs exactly once on a later turn (error non-NULL: the statement failed). Returns 0 or
 * -errno (cb not called). */
int effects_claim_email(struct effects *fx, const char *event_id, const char *token,
                        int64_t ttl_ms, effects_claim_fn cb, void *ud);

/* db and hc are borrowed (owned by the caller, outlive the effects). consumer_group names
 * the group in processed_events. */
int effects_create(struct effects **out, uv_loop_t *loop, const struct cfg *cfg,
                   const char *consumer_group, struct dbp *db, struct hc *hc);

/* Shutdown, step 1: no new external call starts (effects_call returns -ECANCELED). Call
 * before closing the hc. */
void effects_stop(struct effects *fx);

/* Statements and calls in progress. */
unsigned effects_inflight(const struct effects *fx);

/* Frees fx. Everything in progress must have finished (close hc and db first: their
 * callbacks run with the closing errors). */
void effects_free(struct effects *fx);

#endif
