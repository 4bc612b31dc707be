/* log: one line per event, logfmt (key=value), level-gated before arguments are evaluated.
 *
 *   log_info("http", "event=listen addr=%s", addr);
 *   -> ts=2026-11-26T19:40:00.123Z level=info mod=http event=listen addr=0.0.0.0:8080
 *
 * Never pass a phone number or a secret: mask phones with log_mask_phone(). */
#ifndef TICKETD_LOG_H
#define TICKETD_LOG_H

#include <stdbool.h>
#include <stddef.h>

enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR };

extern int log_min_level;

/* Sets the level from "debug", "info", "warn" or "error"; returns 0, or -1 when unknown. */
int log_set_level(const char *name);

void log_emit(int level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_at(lvl, mod, ...)                                                                  \
    do {                                                                                       \
        if ((lvl) >= log_min_level) log_emit((lvl), (mod), __VA_ARGS__);                       \
    } while (0)
#define log_debug(mod, ...) log_at(LOG_DEBUG, mod, __VA_ARGS__)
#define log_info(mod, ...) log_at(LOG_INFO, mod, __VA_ARGS__)
#define log_warn(mod, ...) log_at(LOG_WARN, mod, __VA_ARGS__)
#define log_error(mod, ...) log_at(LOG_ERROR, mod, __VA_ARGS__)

/* From here on lines go through a buffer of buffer_bytes that a writer thread empties, so a
 * stalled stderr never blocks the caller; a line that does not fit is dropped and counted
 * (ticketd_log_dropped_total, registered here; a "lines_dropped" line follows once stderr
 * moves again). Before it, and in CLI commands that never call it, writes are blocking.
 * Call from the loop thread before other threads log. Returns 0 or a negative errno. */
int log_async_start(size_t buffer_bytes);

/* Waits up to timeout_ms for the buffer to be written out; true when it was. */
bool log_flush(int timeout_ms);

unsigned long long log_dropped_lines(void);

/* Writes a masked form of a phone number ("01012345678" or "010-1234-5678" ->
 * "010-****-5678") into out (at least 16 bytes). Anything that is not a phone becomes "***". */
void log_mask_phone(const char *phone, char *out, size_t outlen);

/* Quotes s for a logfmt value (escapes '"' and '\\', drops control bytes) into out. */
void log_quote(const char *s, char *out, size_t outlen);

/* log_quote for use inside a log call: quotes s (NULL as "") into buf and returns buf.
 *   char qb[320]; log_error("x", "event=failed err=%s", log_quoted(err, qb, sizeof qb)); */
const char *log_quoted(const char *s, char *buf, size_t n);

#endif
