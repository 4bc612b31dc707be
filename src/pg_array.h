/* pg_array: PostgreSQL array literals ("{...}") for one-round-trip batch statements
 * (unnest($1::text[]) ...), written into a strbuf.
 *
 *   pg_array_open(&b); pg_array_text(&b, "a,b"); pg_array_null(&b); pg_array_int(&b, 7);
 *   pg_array_close(&b);          -> {"a,b",NULL,7}
 *
 * Text elements are always double-quoted, so no content (commas, braces, spaces, the word
 * NULL, an empty string) can be read as syntax; '"' and '\\' get a backslash. The element
 * functions add the ',' themselves. All return 0, or -1 when the buffer refused a write. */
#ifndef TICKETD_PG_ARRAY_H
#define TICKETD_PG_ARRAY_H

#include <stddef.h>
#include <stdint.h>

#include "strbuf.h"

int pg_array_open(struct strbuf *b);
int pg_array_close(struct strbuf *b);

/* s == NULL writes NULL. */
int pg_array_text(struct strbuf *b, const char *s);
int pg_array_textn(struct strbuf *b, const char *s, size_t len);
int pg_array_null(struct strbuf *b);
int pg_array_int(struct strbuf *b, int64_t v);

#endif
