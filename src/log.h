/* log: one line per event, logfmt (key=value), level-gated before arguments are evaluated.
 *
 *   log_info("http", "event=listen addr=%s", addr);
 *   -> ts=2026-11-26T19:40:00.123Z level=info mod=http event=listen addr=0.0.0.0:8080
 *
 * Never pass a phone number or a secret: mask phones with log_mask_phone(). */
#ifndef TICKETD_LOG_H
#define TICKETD_LOG_H

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

/* Writes a masked form of a phone number ("01012345678" or "010-1234-5678" ->
 * "010-****-5678") into out (at least 16 bytes). Anything that is not a phone becomes "***". */
void log_mask_phone(const char *phone, char *out, size_t outlen);

/* Quotes s for a logfmt value (escapes '"' and '\\', drops control bytes) into out. */
void log_quote(const char *s, char *out, size_t outlen);

#endif
