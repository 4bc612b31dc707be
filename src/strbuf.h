/* strbuf: one growable byte buffer with a cap. The contents stay NUL-terminated. A write
 * that would pass the cap (or runs out of memory) fails, leaves the buffer as it was, and
 * marks it failed: later writes fail too, so a builder can check once at the end. */
#ifndef TICKETD_STRBUF_H
#define TICKETD_STRBUF_H

#include <stdbool.h>
#include <stddef.h>

#include "limits.h"

struct strbuf {
    char *p;      /* NULL until the first write; strbuf_str() never is */
    size_t len;   /* bytes held, without the terminating NUL */
    size_t cap;   /* bytes allocated */
    size_t max;   /* the cap on len; 0 means STRBUF_MAX_DEFAULT */
    bool failed;  /* a write was refused */
};

#define STRBUF_INIT {0}

/* An empty buffer holding at most max bytes (0: STRBUF_MAX_DEFAULT). */
void strbuf_init(struct strbuf *b, size_t max);

/* Makes room for extra more bytes. Returns 0, or -1 (past the cap, or out of memory). */
int strbuf_reserve(struct strbuf *b, size_t extra);

int strbuf_append(struct strbuf *b, const void *data, size_t n);
int strbuf_puts(struct strbuf *b, const char *s);
int strbuf_putc(struct strbuf *b, char c);
int strbuf_printf(struct strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The contents ("" when empty). */
const char *strbuf_str(const struct strbuf *b);

/* Empties the buffer and clears failed; the memory is kept for reuse. */
void strbuf_reset(struct strbuf *b);

/* Hands the contents (malloc'd, NUL-terminated, never NULL unless out of memory) to the
 * caller and leaves the buffer empty. */
char *strbuf_take(struct strbuf *b);

void strbuf_free(struct strbuf *b);

#endif
