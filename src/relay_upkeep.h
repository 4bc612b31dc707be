/* relay_upkeep: the active relay's upkeep of the outbox table, apart from delivery.
 *
 * Retention: published rows older than OUTBOX_RETENTION are deleted in batches of
 * RELAY_RETENTION_BATCH (another batch follows a full one at once), but only rows whose event
 * is accounted for (processed with every effect done, or dead-lettered): any other row is
 * the evidence the audit needs, kept whatever its age. A row's age is that of its first
 * publication record (outbox_publications); after the rows, the records older than
 * OUTBOX_RETENTION none of whose rows is left go too, in batches the same way. Backlog: the gauges
 * ticketd_outbox_backlog and ticketd_outbox_oldest_unpublished_age_seconds. */
#ifndef TICKETD_RELAY_UPKEEP_H
#define TICKETD_RELAY_UPKEEP_H

#include <stdbool.h>
#include <stdint.h>

struct dbp;

struct relay_upkeep {
    struct dbp *db;          /* retention runs here (may be slow) */
    int64_t retention_ms;
    bool (*may_run)(void *ud); /* asked before each retention batch: active and not closing */
    void *ud;
    bool retention_inflight, backlog_inflight;
    bool records;            /* this round has reached the publication records */
};

/* Deletes one batch now unless one is in flight or may_run says no. */
void relay_upkeep_retention(struct relay_upkeep *u);

/* Refreshes the backlog gauges with one query on session (skipped while one is in flight). */
void relay_upkeep_backlog(struct relay_upkeep *u, struct dbp *session);

/* Describes the gauges; once, at start. */
void relay_upkeep_describe(void);

#endif
