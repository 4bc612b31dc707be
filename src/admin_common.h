/* admin_common (admin_): the small things every admin tool (audit, trace, dlq, report)
 * shares: one-line error texts, timestamps and JSON text. The rest of their common ground is
 * split by concern: admin_pg.h (blocking PostgreSQL), admin_kafka.h (the read-only Kafka
 * reader), admin_cli.h (the frame of the CLI commands). Functions taking err/errlen fill err
 * with a one-line message when they fail. */
#ifndef TICKETD_ADMIN_COMMON_H
#define TICKETD_ADMIN_COMMON_H

#include <json-c/json.h>
#include <stddef.h>
#include <stdint.h>

/* snprintf into err (nothing when err is NULL or errlen 0). */
void admin_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Milliseconds since the epoch as RFC 3339 UTC ("2026-11-26T19:40:00.123Z"), or "unknown". */
void admin_format_ms(int64_t ms, char *out, size_t outlen);

/* A JSON string of s, or JSON null (NULL) when s is NULL. */
json_object *admin_json_text(const char *s);

#endif
