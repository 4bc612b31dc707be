/* dlq_writer (dlq_writer_): writes a dead letter, on the loop, for the consumer.
 *
 * Guarantee: a letter is written when its message is in the DLQ topic, acknowledged by the
 * broker (idempotent acks=all producer: no duplicate from the producer's own retries), AND
 * its dead_letters row committed. Only then the caller may move the source offset past it.
 * Crash or failure between the two steps: the caller writes the letter again; a retry after
 * the produce was acknowledged records only (the row is keyed by the DLQ position, inserted
 * if missing), so a letter has one row; a produce retried by the caller may leave a second
 * copy in the topic (the replay skips a second dead letter of an event it already replayed).
 *
 * The message is the original key, value and headers (their dlq_* headers removed: a
 * replayed event failing again) plus the dlq_* headers of dlq.h. Retries, their backoff and
 * the decision to wait or to give up belong to the caller (consumer.h). */
#ifndef TICKETD_DLQ_WRITER_H
#define TICKETD_DLQ_WRITER_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"

struct dbp;
struct dlq_writer;

/* One dead letter. The caller owns it and everything it points to, unchanged, from
 * dlq_writer_write until the callback. */
struct dlq_letter {
    const rd_kafka_message_t *m;   /* the original message */
    bool poison;                   /* not parsed: the ids come from the ce_id header and key */
    const char *event_id;          /* the parsed event's ce_id (unless poison) */
    int64_t application_id;        /* ... and its application id */
    int attempts;
    const char *error_class, *error_message;
    void *ud;                      /* the caller's */
    /* -1 until the broker acknowledged the produce; then its DLQ position, and a write of
     * the same letter records the row only. Set it to -1 for a new letter. */
    int32_t dlq_partition;
    int64_t dlq_offset;
};

enum dlq_step { DLQ_STEP_PRODUCE, DLQ_STEP_RECORD };

/* ok: produced, acknowledged and recorded. Else `failed` names the step and error why. */
typedef void (*dlq_written_fn)(struct dlq_letter *l, bool ok, enum dlq_step failed,
                               const char *error);

/* brokers and cfg (KAFKA_CONFIG) configure the producer, cfg->dlq_topic is written; both
 * outlive the writer. db is borrowed (outlives the writer's use of it). cb runs once per successful dlq_writer_write, on the loop. Returns 0 or -1
 * (logged). */
int dlq_writer_create(struct dlq_writer **out, uv_loop_t *loop, const struct cfg *cfg,
                      const char *brokers, struct dbp *db, dlq_written_fn cb);

/* Writes l (or records it, when l->dlq_partition >= 0). Returns 0 (cb will run), or -1 with
 * err filled and the failed step in *failed (cb not called). */
int dlq_writer_write(struct dlq_writer *w, struct dlq_letter *l, enum dlq_step *failed,
                     char *err, size_t errlen);

/* Letters being written. */
unsigned dlq_writer_inflight(const struct dlq_writer *w);

/* Shutdown, on the loop: purges what was not delivered; no callback runs any more (the
 * letters are left unwritten: their events are re-delivered to the next owner). */
void dlq_writer_stop(struct dlq_writer *w);

/* Stops (if not yet) and destroys the producer; blocking (joins rdkafka's threads): off
 * the loop, or at start-up. */
void dlq_writer_free(struct dlq_writer *w);

#endif
