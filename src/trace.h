/* trace (trace_): one customer's trail across the DB, the outbox, the topic, the consumer and
 * the DLQ, for the "I applied but there is no record" call.
 *
 * For each application of the phone (optionally of one show): the application row; its
 * outbox row(s); the topic record read back at the recorded partition/offset (timestamp,
 * key, ce_id, and whether the ce_id is this event's); the consumer status (processed when,
 * or dead-lettered with its error, or pending above the group's committed offset, or LOST:
 * below the committed offset yet neither processed nor dead-lettered); each follow-up effect
 * (points, data platform, e-mail) and the points granted. Outbox rows whose payload has the
 * phone but whose application row is gone are shown too.
 *
 * When the DB has no row for the phone, or a read-back did not find the event where the row
 * says (or --scan), the topic and the DLQ topic are searched for messages whose value has
 * that phone: every partition, from its low to its high watermark (bounded), as the seed's
 * team did by hand; matches say whether their ce_id has an outbox row.
 *
 * The phone: the trace output shows the number that was asked for, in full — the operator
 * typed it (CLI) or sent it with the admin token (HTTP), and matching it is the point. Logs
 * written while tracing mask it (log_mask_phone), as everywhere else.
 *
 * Blocking code: the CLI calls it directly; HTTP runs it on the thread pool. */
#ifndef TICKETD_TRACE_H
#define TICKETD_TRACE_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdio.h>

#include "config.h"
#include "limits.h" /* TRACE_ROWS_MAX */

struct trace_opts {
    const char *phone;      /* as typed: "010-1234-5678" or digits */
    const char *event_id;   /* the show; NULL = all */
    bool scan;              /* search the topic and the DLQ even when the DB has the rows */
};

/* Writes the trail to human_out (when not NULL) and *json_out (when not NULL; caller owns).
 * Returns how many records were found (applications, orphan outbox rows, topic matches):
 * 0 = nothing anywhere; -1 on error (err filled), -2 on a bad phone or event id. */
int trace_run(const struct cfg *cfg, const char *brokers, const struct trace_opts *opts,
              FILE *human_out, json_object **json_out, char *err, size_t errlen);

/* `ticketd trace --phone P [--event-id E] [--scan] [--json] [settings flags]`: a main.c
 * command like audit_main (its own flags first, then the settings flags; `loaded` unused).
 * Exit status: 0 something found, 1 nothing found anywhere, 2 error. */
int trace_main(struct cfg *loaded, int argc, char **argv);

#endif
