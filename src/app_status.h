/* app_status: the one rule of an application's status, as SQL shared by every reader (the
 * public GET /v1/applications/{reference}, the admin record and lookup, ticketd trace), so
 * that no two of them can disagree about the same application.
 *
 *   dead_lettered  a dead letter of its event not replayed since (wins over processed: the
 *                  consumer gave up on something, an operator has to look)
 *   processed      a processed_events row and no effect left undone
 *   published      the outbox row has a publication record (outbox_publications)
 *   applied        otherwise
 *
 * APP_STATUS_SQL expects the aliases o (the outbox row as the view outbox_status shows it:
 * with published_at, kafka_partition, kafka_offset of its first publication record) and p
 * (its processed_events row, joined with APP_STATUS_JOIN_SQL or the like). */
#ifndef TICKETD_APP_STATUS_H
#define TICKETD_APP_STATUS_H

#define APP_STATUS_SQL                                                                         \
    "CASE "                                                                                    \
    "  WHEN EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id "               \
    "               AND d.replayed_at IS NULL) THEN 'dead_lettered' "                          \
    "  WHEN p.event_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM event_effects e "             \
    "       WHERE e.event_id = o.event_id AND NOT e.done) THEN 'processed' "                   \
    "  WHEN o.published_at IS NOT NULL THEN 'published' "                                      \
    "  ELSE 'applied' END"

/* p for APP_STATUS_SQL, given o. */
#define APP_STATUS_JOIN_SQL " LEFT JOIN processed_events p ON p.event_id = o.event_id "

/* An application a with its newest outbox row o and that row's p. */
#define APP_STATUS_FROM_SQL                                                                    \
    " FROM applications a "                                                                    \
    "LEFT JOIN LATERAL (SELECT * FROM outbox_status ob WHERE ob.aggregate_id = a.id "          \
    "                   ORDER BY ob.id DESC LIMIT 1) o ON true" APP_STATUS_JOIN_SQL

#endif
