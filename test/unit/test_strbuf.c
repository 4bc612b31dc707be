/* strbuf (cap, sticky failure) and pg_array (text[] literal quoting, NULLs). The array
 * literals are also checked for what PostgreSQL reads back in test_relay and the ingest
 * SQL test; here the exact bytes. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pg_array.h"
#include "strbuf.h"

static void test_strbuf(void)
{
    struct strbuf b;
    strbuf_init(&b, 16);
    CHECK(strcmp(strbuf_str(&b), "") == 0, "empty buffer reads as \"\"");
    CHECK(strbuf_puts(&b, "hello") == 0 && strbuf_printf(&b, " %d", 42) == 0 &&
              strcmp(strbuf_str(&b), "hello 42") == 0 && b.len == 8,
          "append and printf-append");
    CHECK(strbuf_append(&b, "0123456789", 9) != 0, "a write past the cap fails");
    CHECK(b.failed && strcmp(strbuf_str(&b), "hello 42") == 0, "...and leaves the contents");
    CHECK(strbuf_putc(&b, 'x') != 0, "...and later writes fail too");
    strbuf_reset(&b);
    CHECK(!b.failed && b.len == 0 && strcmp(strbuf_str(&b), "") == 0, "reset empties and clears");
    CHECK(strbuf_append(&b, "0123456789abcdef", 16) == 0, "exactly the cap fits");
    CHECK(strbuf_printf(&b, "%s", "") == 0, "an empty printf at the cap fits");
    CHECK(strbuf_printf(&b, "%d", 1) != 0, "a printf past the cap fails");
    strbuf_free(&b);
    CHECK(b.p == NULL && b.len == 0 && b.max == 16, "free keeps the cap");

    struct strbuf r = STRBUF_INIT;
    CHECK(strbuf_reserve(&r, 100) == 0 && r.p && r.p[0] == '\0', "reserve alone leaves \"\"");
    strbuf_free(&r);

    struct strbuf big = STRBUF_INIT;
    int ok = 0;
    for (int i = 0; i < 10000; i++) ok |= strbuf_printf(&big, "%04d", i % 10000);
    CHECK(ok == 0 && big.len == 40000 && memcmp(big.p + 39996, "9999", 4) == 0,
          "grows without a cap of its own (default cap)");
    char *s = strbuf_take(&big);
    CHECK(s && strlen(s) == 40000 && big.p == NULL, "take hands the contents over");
    free(s);
    s = strbuf_take(&big);
    CHECK(s && *s == '\0', "take of an empty buffer gives \"\"");
    free(s);
}

static void test_pg_array(void)
{
    struct strbuf b = STRBUF_INIT;
    pg_array_open(&b);
    pg_array_close(&b);
    CHECK(strcmp(strbuf_str(&b), "{}") == 0, "empty array: %s", strbuf_str(&b));

    strbuf_reset(&b);
    pg_array_open(&b);
    pg_array_text(&b, "plain");
    pg_array_text(&b, "");
    pg_array_text(&b, NULL);
    pg_array_text(&b, "NULL");
    pg_array_text(&b, "a,b {c} d");
    pg_array_text(&b, "say \"hi\" \\o/");
    pg_array_int(&b, -12);
    pg_array_textn(&b, "abc\"def", 4);
    CHECK(pg_array_close(&b) == 0, "literal built");
    const char *want =
        "{\"plain\",\"\",NULL,\"NULL\",\"a,b {c} d\",\"say \\\"hi\\\" \\\\o/\",-12,\"abc\\\"\"}";
    CHECK(strcmp(strbuf_str(&b), want) == 0, "quoting and NULLs: %s", strbuf_str(&b));

    strbuf_reset(&b);
    pg_array_open(&b);
    pg_array_null(&b);
    pg_array_int(&b, 9223372036854775807LL);
    pg_array_close(&b);
    CHECK(strcmp(strbuf_str(&b), "{NULL,9223372036854775807}") == 0, "NULL first, int64: %s",
          strbuf_str(&b));
    strbuf_free(&b);

    struct strbuf capped;
    strbuf_init(&capped, 8);
    pg_array_open(&capped);
    int rc = pg_array_text(&capped, "0123456789");
    CHECK(rc != 0 && capped.failed, "an element past the cap fails");
    CHECK(pg_array_close(&capped) != 0, "...and so does closing the literal");
    strbuf_free(&capped);
}

int main(void)
{
    test_strbuf();
    test_pg_array();
    return CHECK_SUMMARY();
}
