/* report (report_): the post-event report of one ticket opening, a self-contained HTML
 * document (no external assets; prints to PDF as it is) for the compliance side.
 *
 * It is built on the audit (audit_run's JSON report: same snapshot rules, same verdict, same
 * counts) and adds what the audit does not show, read in one REPEATABLE READ transaction just
 * after it: the offset range per partition of the show's messages, events processed, each
 * follow-up (points, data platform, e-mail) delivered / dead-lettered / replayed / still open,
 * the dead letters, the accepted/published/processed timeline (inline SVG), and who the
 * applications still not where they should be are (id, reference, masked phone).
 *
 * The document: the verdict in one sentence, then the evidence section, then the state of the
 * topic and the consumer group (watermarks, committed offsets, lag: shared by every show), then
 * "about this report" (when, which version, which database (redacted) and cluster, the SHA-256
 * of the evidence section). The evidence section is the bytes between the lines
 * "<!-- evidence:begin -->\n" and "\n<!-- evidence:end -->" (exclusive); it holds this show's
 * data only, and no time of generation, so a later run on unchanged data gives the same hash
 * (another show's opening in between does not change it). Everything from data is
 * HTML-escaped; no full phone number or e-mail appears.
 *
 * Refusals (409 duplicate, 400/422 invalid) write nothing durable today: the report says so
 * and names the process-lifetime counters that count them (not durable, all shows).
 *
 * Blocking (sync libpq, rdkafka): the CLI calls it directly; the HTTP handler runs it on
 * libuv's thread pool (admin_http.c), never on the loop. */
#ifndef TICKETD_REPORT_H
#define TICKETD_REPORT_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "limits.h" /* REPORT_LIST_MAX, REPORT_BUCKETS_MAX */

struct report_result {
    char *html;           /* malloc'd, NUL-terminated; the caller frees it */
    size_t len;
    char sha256[65];      /* hex SHA-256 of the evidence section */
    bool complete;        /* the audit's verdict */
    long long missing;    /* the audit's count of applications missing */
};

/* Builds the report of show event_id (required) against cfg->database_url and brokers.
 * Returns 0 (res filled), -1 on error (DB or Kafka unreachable or failing) or -2 on a bad
 * event id, with a message in err. */
int report_run(const struct cfg *cfg, const char *brokers, const char *event_id,
               struct report_result *res, char *err, size_t errlen);

/* `ticketd report --event-id E [--out FILE.html] [--json] [settings flags]` (main.c command,
 * parse_flags false). Without --out the HTML goes to stdout; with it, one summary line (or
 * JSON with --json). Exit status: 0 nothing missing, 1 something missing, 2 error. */
int report_main(struct cfg *loaded, int argc, char **argv);

#endif
