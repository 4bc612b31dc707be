/* Unit tests of log.c: phone masking, logfmt quoting, level gating (arguments of a gated-off
 * call are not even evaluated) and the line format written to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "check.h"


static void test_mask(void)
{
    struct {
        const char *in, *out;
    } m[] = {
        {"010-1234-5678", "010-****-5678"}, {"01012345678", "010-****-5678"},
        {"011-123-5678", "011-***-5678"},   {"0111235678", "011-***-5678"},
        {"0191234567", "019-***-4567"},     {"hello", "***"},
        {"", "***"},                        {"010123456789", "***"},
        {"02-123-4567", "***"},             {"010 1234 5678", "***"},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        char out[32];
        log_mask_phone(m[i].in, out, sizeof out);
        CHECK(strcmp(out, m[i].out) == 0, "mask \"%s\" -> \"%s\" (got \"%s\")", m[i].in, m[i].out,
              out);
    }
    char out[32];
    log_mask_phone(NULL, out, sizeof out);
    CHECK(strcmp(out, "***") == 0, "mask NULL -> ***");
    char small[16];
    log_mask_phone("01012345678", small, sizeof small);
    CHECK(strcmp(small, "010-****-5678") == 0, "mask fits a 16-byte buffer");
}

static void test_quote(void)
{
    char out[64];
    log_quote("plain", out, sizeof out);
    CHECK(strcmp(out, "\"plain\"") == 0, "quote plain");
    log_quote("a \"b\" \\c", out, sizeof out);
    CHECK(strcmp(out, "\"a \\\"b\\\" \\\\c\"") == 0, "quote escapes quote and backslash (%s)", out);
    log_quote("line1\nline2\r\t\x01", out, sizeof out);
    CHECK(strcmp(out, "\"line1line2\"") == 0, "quote drops control bytes (%s)", out);
    log_quote(NULL, out, sizeof out);
    CHECK(strcmp(out, "\"\"") == 0, "quote NULL -> \"\"");
    char tiny[6];
    log_quote("abcdefgh", tiny, sizeof tiny);
    CHECK(strcmp(tiny, "\"abc\"") == 0, "quote truncates but stays quoted (%s)", tiny);
    log_quote("한글", out, sizeof out);
    CHECK(strcmp(out, "\"한글\"") == 0, "quote keeps UTF-8");
}

static int evaluated;
static int side_effect(void)
{
    evaluated++;
    return 7;
}

/* Captures stderr while fn runs. */
static void capture(void (*fn)(void), char *buf, size_t len)
{
    fflush(stderr);
    int saved = dup(2);
    FILE *tmp = tmpfile();
    dup2(fileno(tmp), 2);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(tmp);
    size_t n = fread(buf, 1, len - 1, tmp);
    buf[n] = '\0';
    fclose(tmp);
}

static void emit_some(void)
{
    log_debug("t", "event=debug_line x=%d", side_effect());
    log_info("t", "event=info_line x=%d", side_effect());
    log_warn("t", "event=warn_line");
    log_error("t", "event=error_line");
    log_info("t", "event=multi text=first\nforged=line");
}

static void test_levels_and_format(void)
{
    char buf[4096];
    CHECK(log_set_level("warn") == 0, "set level warn");
    CHECK(log_set_level("loud") == -1 && log_min_level == LOG_WARN, "unknown level rejected");
    evaluated = 0;
    capture(emit_some, buf, sizeof buf);
    CHECK(evaluated == 0, "arguments of gated-off calls not evaluated");
    CHECK(!strstr(buf, "debug_line") && !strstr(buf, "info_line"), "debug/info gated at warn");
    CHECK(strstr(buf, "level=warn mod=t event=warn_line\n") != NULL, "warn line written");
    CHECK(strstr(buf, "level=error mod=t event=error_line\n") != NULL, "error line written");

    log_set_level("debug");
    evaluated = 0;
    capture(emit_some, buf, sizeof buf);
    CHECK(evaluated == 2, "arguments evaluated at debug");
    CHECK(strstr(buf, "level=debug mod=t event=debug_line x=7\n") != NULL, "debug line written");
    CHECK(strncmp(buf, "ts=", 3) == 0 && buf[7] == '-' && buf[13] == 'T' && strstr(buf, "Z level="),
          "line starts with an RFC 3339 UTC timestamp (%.40s)", buf);
    CHECK(strstr(buf, "text=first forged=line\n") != NULL, "embedded newline cannot split a line");
    int lines = 0;
    for (char *p = buf; *p; p++) lines += *p == '\n';
    CHECK(lines == 5, "one line per call (%d)", lines);
    log_set_level("info");
}

int main(void)
{
    test_mask();
    test_quote();
    test_levels_and_format();
    return CHECK_SUMMARY();
}
