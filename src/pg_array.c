#include "pg_array.h"

#include <inttypes.h>
#include <string.h>

int pg_array_open(struct strbuf *b)
{
    return strbuf_putc(b, '{');
}

/* A separator unless this is the first element (the buffer ends with the opening brace). */
static int separate(struct strbuf *b)
{
    if (b->len && b->p[b->len - 1] == '{') return b->failed ? -1 : 0;
    return strbuf_putc(b, ',');
}

int pg_array_close(struct strbuf *b)
{
    return strbuf_putc(b, '}');
}

int pg_array_textn(struct strbuf *b, const char *s, size_t len)
{
    if (!s) return pg_array_null(b);
    if (separate(b) != 0 || strbuf_reserve(b, len + 2) != 0) return -1;
    strbuf_putc(b, '"');
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] != '"' && s[i] != '\\') continue;
        strbuf_append(b, s + start, i - start);
        strbuf_putc(b, '\\');
        start = i;
    }
    strbuf_append(b, s + start, len - start);
    return strbuf_putc(b, '"');
}

int pg_array_text(struct strbuf *b, const char *s)
{
    return pg_array_textn(b, s, s ? strlen(s) : 0);
}

int pg_array_null(struct strbuf *b)
{
    if (separate(b) != 0) return -1;
    return strbuf_append(b, "NULL", 4);
}

int pg_array_int(struct strbuf *b, int64_t v)
{
    if (separate(b) != 0) return -1;
    return strbuf_printf(b, "%" PRId64, v);
}
