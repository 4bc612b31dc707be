/* audit (audit_): proves that no application went missing, stage by stage.
 *
 *   1. applications <-> outbox: every application has its outbox row, and every outbox row
 *      its application (anti-joins);
 *   2. outbox <-> Kafka: every outbox row older than AUDIT_GRACE is published, and the
 *      message at its recorded (partition, offset) carries its ce_id. A merge join: the
 *      published rows stream from a server-side cursor ordered by (partition, offset) while
 *      each partition of the topic is read once, from its low to its high watermark.
 *      Messages at no row's position whose ce_id is in no outbox row are "orphans". Rows
 *      below a partition's low watermark are "expired" (deleted by Kafka's retention; the
 *      DB's acknowledgement is the evidence): not missing when their event was consumed
 *      (stage 3), missing ("expired_unconsumed") when it was not;
 *   3. Kafka <-> consumer: the group's committed offsets (read with a handle that carries the
 *      group id but never subscribes, so it never joins the group); every event below the
 *      committed offset is processed (and every event_effects row of it done) or
 *      dead-lettered; an event still sitting in the DLQ (not replayed) is named too; the lag
 *      per partition (high watermark - committed) is shown. An event not consumed yet (at
 *      or above the committed offset, or no offset committed at all) is "pending" within
 *      AUDIT_GRACE of its creation and missing ("not_consumed") past it. An OffsetFetch that
 *      fails, for the request or for one partition, is an error (exit 2), never "no offset".
 *
 * An application whose outbox row was pruned (the relay prunes only rows whose event was
 * processed or dead-lettered) is checked against points_ledger, event_effects and
 * dead_letters by application id.
 *
 * Verdict: "complete" only when every application is accounted for end to end; "incomplete"
 * when any is missing; "in_progress" when none is missing but some are still within
 * AUDIT_GRACE (unpublished or not consumed yet).
 *
 * Consistency on a live system: committed offsets are read first, then the DB snapshot is
 * taken (one REPEATABLE READ transaction for every stage), then the watermarks; so each row
 * in the snapshot was acknowledged below the watermark read, and each event the group had
 * committed past was already recorded as processed or dead-lettered in the snapshot.
 *
 * Memory is bounded whatever the size: counts are exact, the lists of ids are capped at
 * AUDIT_LIST_MAX per category ("truncated" says when).
 *
 * Blocking code (sync libpq, rdkafka): the CLI calls it directly; the HTTP handlers run it
 * on libuv's thread pool by the admin HTTP adapter, never on the loop. */
#ifndef TICKETD_AUDIT_H
#define TICKETD_AUDIT_H

#include <json-c/json.h>
#include <stdio.h>

#include "config.h"
#include "limits.h"

struct audit_opts {
    const char *event_id;   /* the show (applications.event_id); NULL = all */
    const char *since;      /* timestamptz text: applications/rows created at or after; NULL = all */
    int64_t *in_flight;     /* when not NULL: set to the applications not through yet but
                               within AUDIT_GRACE (verdict "in_progress" when none is missing) */
};

/* Runs the three stages against cfg->database_url and brokers (bootstrap.servers; plus
 * cfg->kafka_config). The report goes to human_out (when not NULL: per-stage counts, the ids
 * missing at each, the lag per partition, then the verdict line `complete: N applications,
 * 0 missing`, `in progress: N applications, 0 missing, F not through yet (within
 * AUDIT_GRACE)` or `incomplete: N applications, K missing: <application ids>`), and to
 * *json_out (when not NULL; the caller owns the object). K counts distinct applications (an
 * application failing at two stages counts once; each category keeps its own exact count).
 * Returns K (0 = nothing missing); -1 on error with a message in err (DB or Kafka
 * unreachable or failing); -2 on bad options (event id, --since), message in err. */
int audit_run(const struct cfg *cfg, const char *brokers, const struct audit_opts *opts,
              FILE *human_out, json_object **json_out, char *err, size_t errlen);

/* `ticketd audit [--event-id E] [--since T] [--json] [settings flags]`: a main.c command
 * (parse_flags false; argv holds the arguments after "audit"). It takes its own flags out,
 * then loads the configuration again from the environment and the remaining settings
 * flags (`loaded` is not used). Exit status: 0 complete, 1 something missing or still in
 * progress (the verdict line says which), 2 error. */
int audit_main(struct cfg *loaded, int argc, char **argv);

#endif
