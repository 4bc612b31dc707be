/* Unit tests of validate.c: every rule of the application body, valid and invalid, plus
 * phone normalisation, event ids and the UTF-8 checker. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "validate.h"
#include "check.h"


static struct application_in app;
static struct field_error err;

static int parse_n(const char *body, size_t len)
{
    memset(&app, 0x5A, sizeof app);
    memset(&err, 0, sizeof err);
    return validate_application(body, len, &app, &err);
}

static int parse(const char *body)
{
    return parse_n(body, strlen(body));
}

/* The body must be rejected and the error must name field. */
static void expect_reject(const char *body, size_t len, const char *field, const char *what)
{
    int rc = parse_n(body, len);
    CHECK(rc == -1 && strcmp(err.field, field) == 0 && err.message[0] != '\0',
          "reject %s -> field=%s (got rc=%d field=%s message=%s)", what, field, rc, err.field,
          err.message);
}

static void expect_reject_s(const char *body, const char *field, const char *what)
{
    expect_reject(body, strlen(body), field, what);
}

static void test_valid_bodies(void)
{
    int rc = parse("{\"event_id\":\"sbs-2026\",\"phone\":\"010-1234-5678\",\"name\":\"홍길동\","
                   "\"email\":\"hong@example.com\",\"seats\":2}");
    CHECK(rc == 0, "full valid body accepted (%s)", err.message);
    CHECK(strcmp(app.event_id, "sbs-2026") == 0, "event_id copied");
    CHECK(strcmp(app.phone, "01012345678") == 0, "phone normalised to digits (%s)", app.phone);
    CHECK(strcmp(app.name, "홍길동") == 0, "UTF-8 name copied");
    CHECK(strcmp(app.email, "hong@example.com") == 0, "email copied");
    CHECK(app.seats == 2, "seats copied");

    rc = parse("{\"event_id\":\"E.1_x-Y\",\"phone\":\"01112345678\",\"name\":\"Kim\"}");
    CHECK(rc == 0, "minimal body accepted");
    CHECK(app.seats == 1, "seats defaults to 1 (%d)", app.seats);
    CHECK(app.email[0] == '\0', "absent email is empty");

    rc = parse("{\"event_id\":\"e\",\"phone\":\"010 1234 5678\",\"name\":\"A\",\"email\":null,"
               "\"seats\":null}");
    CHECK(rc == 0 && app.email[0] == '\0' && app.seats == 1, "null email and seats mean absent");

    rc = parse("{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\",\"email\":\"\"}");
    CHECK(rc == 0 && app.email[0] == '\0', "empty email means none");

    rc = parse("  \n{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\",\"extra\":{\"x\":[1,2,{}]}}\r\n\t ");
    CHECK(rc == 0, "surrounding whitespace and unknown nested fields accepted");

    rc = parse("{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"  Lee  \"}");
    CHECK(rc == 0 && strcmp(app.name, "Lee") == 0, "name trimmed of surrounding spaces (%s)",
          app.name);

    rc = parse("{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"\\uD55C\\uAE00\"}");
    CHECK(rc == 0 && strcmp(app.name, "한글") == 0, "escaped \\u name decoded");

    rc = parse("{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"\\uD83D\\uDE00\"}");
    CHECK(rc == 0 && strcmp(app.name, "\xF0\x9F\x98\x80") == 0, "surrogate pair decoded to U+1F600");

    for (int s = 1; s <= 4; s++) {
        char body[128];
        snprintf(body, sizeof body,
                 "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\",\"seats\":%d}", s);
        CHECK(parse(body) == 0 && app.seats == s, "seats %d accepted", s);
    }

    /* name of exactly 100 code points (3-byte each) */
    char body[1024];
    char name[400] = "";
    for (int i = 0; i < 100; i++) strcat(name, "가");
    snprintf(body, sizeof body, "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"%s\"}", name);
    CHECK(parse(body) == 0, "name of 100 code points accepted");
    strcat(name, "가");
    snprintf(body, sizeof body, "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"%s\"}", name);
    expect_reject_s(body, "name", "name of 101 code points");

    /* event_id of exactly 64 and 65 */
    char eid[70];
    memset(eid, 'a', 64);
    eid[64] = '\0';
    snprintf(body, sizeof body, "{\"event_id\":\"%s\",\"phone\":\"01012345678\",\"name\":\"A\"}", eid);
    CHECK(parse(body) == 0, "event_id of 64 chars accepted");
    strcat(eid, "a");
    snprintf(body, sizeof body, "{\"event_id\":\"%s\",\"phone\":\"01012345678\",\"name\":\"A\"}", eid);
    expect_reject_s(body, "event_id", "event_id of 65 chars");
}

static void test_field_rules(void)
{
    const char *p = "\"phone\":\"01012345678\"";
    char b[512];

    expect_reject_s("{\"phone\":\"01012345678\",\"name\":\"A\"}", "event_id", "missing event_id");
    expect_reject_s("{\"event_id\":\"\",\"phone\":\"01012345678\",\"name\":\"A\"}", "event_id",
                    "empty event_id");
    expect_reject_s("{\"event_id\":\"a b\",\"phone\":\"01012345678\",\"name\":\"A\"}", "event_id",
                    "event_id with space");
    expect_reject_s("{\"event_id\":\"a/b\",\"phone\":\"01012345678\",\"name\":\"A\"}", "event_id",
                    "event_id with slash");
    expect_reject_s("{\"event_id\":\"이벤트\",\"phone\":\"01012345678\",\"name\":\"A\"}", "event_id",
                    "event_id non-ASCII");
    expect_reject_s("{\"event_id\":12,\"phone\":\"01012345678\",\"name\":\"A\"}", "event_id",
                    "event_id number");

    expect_reject_s("{\"event_id\":\"e\",\"name\":\"A\"}", "phone", "missing phone");
    expect_reject_s("{\"event_id\":\"e\",\"phone\":1012345678,\"name\":\"A\"}", "phone",
                    "phone as number");
    expect_reject_s("{\"event_id\":\"e\",\"phone\":\"02-123-4567\",\"name\":\"A\"}", "phone",
                    "landline phone");
    expect_reject_s("{\"event_id\":\"e\",\"phone\":\"010-1234-567\",\"name\":\"A\"}", "phone",
                    "short phone");
    expect_reject_s("{\"event_id\":\"e\",\"phone\":\"\",\"name\":\"A\"}", "phone", "empty phone");

    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s}", p);
    expect_reject_s(b, "name", "missing name");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"\"}", p);
    expect_reject_s(b, "name", "empty name");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"   \"}", p);
    expect_reject_s(b, "name", "whitespace-only name");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"a\\nb\"}", p);
    expect_reject_s(b, "name", "name with newline escape");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"a\\u0000b\"}", p);
    expect_reject_s(b, "name", "name with \\u0000");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"a\\u007fb\"}", p);
    expect_reject_s(b, "name", "name with DEL");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"\\uD800\"}", p);
    /* json-c decodes a lone surrogate escape to U+FFFD: storable, never raw surrogate bytes. */
    CHECK(parse(b) == 0 && strcmp(app.name, "\xEF\xBF\xBD") == 0,
          "lone surrogate escape becomes U+FFFD, not invalid UTF-8");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":[\"A\"]}", p);
    expect_reject_s(b, "name", "name as array");

    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"nope\"}", p);
    expect_reject_s(b, "email", "email without @");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"a@b\"}", p);
    expect_reject_s(b, "email", "email domain without dot");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"@b.com\"}", p);
    expect_reject_s(b, "email", "email empty local part");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"a@@b.com\"}", p);
    expect_reject_s(b, "email", "email two @");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"a b@c.com\"}", p);
    expect_reject_s(b, "email", "email with space");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"a@b..com\"}", p);
    expect_reject_s(b, "email", "email empty domain label");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":7}", p);
    expect_reject_s(b, "email", "email as number");
    char longmail[300];
    memset(longmail, 'a', 250);
    strcpy(longmail + 250, "@b.com"); /* 256 bytes */
    char big[512];
    snprintf(big, sizeof big, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"%s\"}", p, longmail);
    expect_reject_s(big, "email", "email over 254 bytes");
    snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"email\":\"first.last+tag@mail.example.co.kr\"}", p);
    CHECK(parse(b) == 0, "email with dots and plus accepted");

    const char *bad_seats[] = {"0", "5", "-1", "2.0", "2e0", "\"2\"", "true", "[2]", "{}",
                               "99999999999999999999"};
    for (size_t i = 0; i < sizeof bad_seats / sizeof bad_seats[0]; i++) {
        snprintf(b, sizeof b, "{\"event_id\":\"e\",%s,\"name\":\"A\",\"seats\":%s}", p, bad_seats[i]);
        char what[64];
        snprintf(what, sizeof what, "seats %s", bad_seats[i]);
        expect_reject_s(b, "seats", what);
    }
}

static void test_body_level(void)
{
    const char *valid = "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\"}";
    char b[512];

    expect_reject("", 0, "body", "empty body");
    expect_reject_s("null", "body", "null");
    expect_reject_s("[]", "body", "array");
    expect_reject_s("\"str\"", "body", "string");
    expect_reject_s("12", "body", "bare number");
    expect_reject_s("{", "body", "truncated object");
    expect_reject_s("{\"event_id\":\"e\",}", "body", "trailing comma");
    expect_reject_s("{'event_id':'e'}", "body", "single quotes");
    expect_reject_s("not json", "body", "garbage");

    snprintf(b, sizeof b, "%s x", valid);
    expect_reject_s(b, "body", "trailing garbage");
    snprintf(b, sizeof b, "%s{}", valid);
    expect_reject_s(b, "body", "second object");
    snprintf(b, sizeof b, "%s /* c */", valid);
    expect_reject_s(b, "body", "trailing comment");

    /* raw NUL inside and after the object */
    char nul[128];
    size_t n = strlen(valid);
    memcpy(nul, valid, n);
    nul[n] = '\0';
    expect_reject(nul, n + 1, "body", "NUL after the object");
    memcpy(nul, "{\"event_id\":\"e\0\",\"phone\":\"01012345678\",\"name\":\"A\"}", 50);
    expect_reject(nul, 50, "body", "NUL inside a string");

    /* invalid UTF-8 in several forms */
    const char *bad_utf8[] = {"\xC3\x28", "\xC0\xAF", "\xE0\x80\xAF", "\xED\xA0\x80",
                              "\xF4\x90\x80\x80", "\xFF", "\x80", "\xE4\xB8"};
    for (size_t i = 0; i < sizeof bad_utf8 / sizeof bad_utf8[0]; i++) {
        snprintf(b, sizeof b, "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A%sB\"}",
                 bad_utf8[i]);
        char what[64];
        snprintf(what, sizeof what, "invalid UTF-8 case %zu", i);
        expect_reject_s(b, "body", what);
    }
    snprintf(b, sizeof b, "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\",\"x\":\"\xC3\x28\"}");
    expect_reject_s(b, "body", "invalid UTF-8 in an unknown field");

    /* deep nesting */
    char deep[2048] = "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\",\"x\":";
    for (int i = 0; i < 200; i++) strcat(deep, "[");
    for (int i = 0; i < 200; i++) strcat(deep, "]");
    strcat(deep, "}");
    expect_reject_s(deep, "body", "nesting 200 deep");

    /* 16 KiB body: a valid one padded with an unknown field */
    size_t size = 16 * 1024;
    char *large = malloc(size + 1);
    int head = snprintf(large, size, "{\"event_id\":\"e\",\"phone\":\"01012345678\",\"name\":\"A\",\"pad\":\"");
    memset(large + head, 'x', size - (size_t)head - 2);
    large[size - 2] = '"';
    large[size - 1] = '}';
    large[size] = '\0';
    CHECK(parse_n(large, size) == 0, "16 KiB body with padding accepted");
    large[size - 1] = ']';
    expect_reject(large, size, "body", "16 KiB body with a broken end");
    free(large);

    /* the body need not be NUL-terminated: parse only len bytes */
    char cut[128];
    snprintf(cut, sizeof cut, "%sGARBAGE", valid);
    CHECK(parse_n(cut, strlen(valid)) == 0, "only len bytes are parsed");
}

static void test_phone(void)
{
    struct {
        const char *in;
        const char *out; /* NULL: rejected */
    } cases[] = {
        {"010-1234-5678", "01012345678"}, {"01012345678", "01012345678"},
        {"010 1234 5678", "01012345678"}, {"011-123-4567", "0111234567"},
        {"0161234567", "0161234567"},     {"019-1234-5678", "01912345678"},
        {"017-123-4567", "0171234567"},   {"018 1234 5678", "01812345678"},
        {"010-123-4567", NULL},           {"0101234567", NULL},
        {"012-1234-5678", NULL},          {"015-1234-5678", NULL},
        {"02-1234-5678", NULL},           {"010--1234-5678", NULL},
        {"-010-1234-5678", NULL},         {"010-1234-5678-", NULL},
        {"010-12345678", NULL},           {"0101-234-5678", NULL},
        {"010-1234-56789", NULL},         {"010123456789", NULL},
        {"+821012345678", NULL},          {"010.1234.5678", NULL},
        {"010-1234-567a", NULL},          {"", NULL},
        {"010-12-345678", NULL},          {" 01012345678", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[PHONE_DIGITS_MAX + 1] = "";
        int rc = validate_phone(cases[i].in, strlen(cases[i].in), out);
        if (cases[i].out)
            CHECK(rc == 0 && strcmp(out, cases[i].out) == 0, "phone \"%s\" -> %s (got %s)",
                  cases[i].in, cases[i].out, rc == 0 ? out : "reject");
        else
            CHECK(rc == -1, "phone \"%s\" rejected", cases[i].in);
    }
    char out[PHONE_DIGITS_MAX + 1];
    CHECK(validate_phone("010-1234-5678xx", 13, out) == 0 && strcmp(out, "01012345678") == 0,
          "phone respects len");
}

static void test_event_id_and_utf8(void)
{
    CHECK(validate_event_id("a", 1), "event_id 'a'");
    CHECK(validate_event_id("A-z_0.9", 7), "event_id mixed allowed chars");
    CHECK(!validate_event_id("", 0), "event_id empty rejected");
    CHECK(!validate_event_id("a+b", 3), "event_id '+' rejected");
    CHECK(!validate_event_id("a\0b", 3), "event_id NUL rejected");

    CHECK(validate_utf8_text("abc", 3) == 3, "utf8 ascii count");
    CHECK(validate_utf8_text("한글", 6) == 2, "utf8 hangul count");
    CHECK(validate_utf8_text("\xF0\x9F\x98\x80", 4) == 1, "utf8 4-byte count");
    CHECK(validate_utf8_text("", 0) == 0, "utf8 empty");
    CHECK(validate_utf8_text("a\tb", 3) == -1, "utf8 tab rejected");
    CHECK(validate_utf8_text("a\0b", 3) == -1, "utf8 NUL rejected");
    CHECK(validate_utf8_text("\xC1\xBF", 2) == -1, "utf8 overlong 2-byte rejected");
    CHECK(validate_utf8_text("\xE0\x9F\xBF", 3) == -1, "utf8 overlong 3-byte rejected");
    CHECK(validate_utf8_text("\xF0\x8F\xBF\xBF", 4) == -1, "utf8 overlong 4-byte rejected");
    CHECK(validate_utf8_text("\xED\xBF\xBF", 3) == -1, "utf8 surrogate rejected");
    CHECK(validate_utf8_text("\xF4\x90\x80\x80", 4) == -1, "utf8 above U+10FFFF rejected");
    CHECK(validate_utf8_text("\xE4\xB8", 2) == -1, "utf8 truncated rejected");
}

/* Idempotency fingerprints: one per request meaning, whatever the spelling. */
static void test_fingerprint(void)
{
    char a[VALIDATE_FINGERPRINT_HEX + 1], b[VALIDATE_FINGERPRINT_HEX + 1];
    CHECK(parse("{\"event_id\":\"gayo\",\"phone\":\"010-1234-5678\",\"name\":\"김민지\","
                "\"email\":\"minji@example.com\",\"seats\":2}") == 0, "fingerprint body");
    validate_fingerprint(&app, a);
    /* sha256("gayo\0" "01012345678\0" "김민지\0" "minji@example.com\0" "2"), by Python's hashlib */
    CHECK(strcmp(a, "589c81d82d3f5b823dab8c0f706cb50705e97e6cc3c20b9108b365dfa663d73b") == 0,
          "SHA-256 of the NUL-separated normalised fields (%s)", a);
    CHECK(parse(" {\"seats\":2, \"email\":\"minji@example.com\",\"name\":\"\\uae40\ubbfc\uc9c0\","
                "\"phone\":\"01012345678\",\"event_id\":\"gayo\",\"extra\":1}") == 0, "respelled body");
    validate_fingerprint(&app, b);
    CHECK(strcmp(a, b) == 0, "same fields in another order and spelling: same fingerprint");
    static const char *const changed[] = {
        "{\"event_id\":\"gayo2\",\"phone\":\"010-1234-5678\",\"name\":\"김민지\",\"email\":\"minji@example.com\",\"seats\":2}",
        "{\"event_id\":\"gayo\",\"phone\":\"010-1234-5679\",\"name\":\"김민지\",\"email\":\"minji@example.com\",\"seats\":2}",
        "{\"event_id\":\"gayo\",\"phone\":\"010-1234-5678\",\"name\":\"김민\",\"email\":\"minji@example.com\",\"seats\":2}",
        "{\"event_id\":\"gayo\",\"phone\":\"010-1234-5678\",\"name\":\"김민지\",\"seats\":2}",
        "{\"event_id\":\"gayo\",\"phone\":\"010-1234-5678\",\"name\":\"김민지\",\"email\":\"minji@example.com\"}",
    };
    for (size_t i = 0; i < sizeof changed / sizeof changed[0]; i++) {
        CHECK(parse(changed[i]) == 0, "changed body %zu parses", i);
        validate_fingerprint(&app, b);
        CHECK(strcmp(a, b) != 0, "changed body %zu: another fingerprint", i);
    }
}

int main(void)
{
    test_valid_bodies();
    test_field_rules();
    test_body_level();
    test_phone();
    test_event_id_and_utf8();
    test_fingerprint();
    return CHECK_SUMMARY();
}
