#include "strbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static size_t cap_of(const struct strbuf *b)
{
    return b->max ? b->max : STRBUF_MAX_DEFAULT;
}

void strbuf_init(struct strbuf *b, size_t max)
{
    *b = (struct strbuf){.max = max};
}

int strbuf_reserve(struct strbuf *b, size_t extra)
{
    if (b->failed) return -1;
    if (extra > cap_of(b) - b->len) {
        b->failed = true;
        return -1;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return 0;
    size_t ncap = b->cap ? b->cap : 64;
    while (ncap < need) ncap = ncap > SIZE_MAX / 2 ? need : ncap * 2;
    char *np = realloc(b->p, ncap);
    if (!np) {
        b->failed = true;
        return -1;
    }
    b->p = np;
    b->cap = ncap;
    b->p[b->len] = '\0';
    return 0;
}

int strbuf_append(struct strbuf *b, const void *data, size_t n)
{
    if (strbuf_reserve(b, n) != 0) return -1;
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

int strbuf_puts(struct strbuf *b, const char *s)
{
    return strbuf_append(b, s, strlen(s));
}

int strbuf_putc(struct strbuf *b, char c)
{
    return strbuf_append(b, &c, 1);
}

int strbuf_printf(struct strbuf *b, const char *fmt, ...)
{
    if (b->failed) return -1;
    va_list ap;
    va_start(ap, fmt);
    char probe[1];
    int n = vsnprintf(probe, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || strbuf_reserve(b, (size_t)n) != 0) {
        b->failed = true;
        return -1;
    }
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

const char *strbuf_str(const struct strbuf *b)
{
    return b->p ? b->p : "";
}

void strbuf_reset(struct strbuf *b)
{
    b->len = 0;
    b->failed = false;
    if (b->p) b->p[0] = '\0';
}

char *strbuf_take(struct strbuf *b)
{
    char *s = b->p ? b->p : calloc(1, 1);
    size_t max = b->max;
    *b = (struct strbuf){.max = max};
    return s;
}

void strbuf_free(struct strbuf *b)
{
    free(b->p);
    size_t max = b->max;
    *b = (struct strbuf){.max = max};
}
