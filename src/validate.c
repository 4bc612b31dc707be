/* validate: the application body -> struct application_in.
 *
 * json-c is lenient in places (it decodes \u0000 into a string, accepts some non-standard
 * input outside strict mode, stops at the end of the first value), so the body is checked
 * for NUL and well-formed UTF-8 before parsing, parsed in strict mode, and everything after
 * the object must be whitespace. Each string field is checked again after decoding because
 * escapes (\u0000, lone surrogates) can produce what the raw body did not contain. */
#include "validate.h"

#include <json-c/json.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "limits.h"


static int fail(struct field_error *err, const char *field, const char *message)
{
    if (err) {
        snprintf(err->field, sizeof err->field, "%s", field);
        snprintf(err->message, sizeof err->message, "%s", message);
    }
    return -1;
}

/* Decodes one UTF-8 sequence at s[i..len); returns its length and the code point, or 0 when
 * malformed (truncated, overlong, surrogate, above U+10FFFF, stray continuation byte). */
static size_t utf8_decode(const unsigned char *s, size_t i, size_t len, uint32_t *cp)
{
    unsigned char c = s[i];
    size_t n;
    uint32_t v, min;

    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0; /* continuation byte, C0/C1 overlong lead, or F5..FF */
    }
    if (len - i < n) return 0;
    for (size_t k = 1; k < n; k++) {
        if ((s[i + k] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (s[i + k] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
    *cp = v;
    return n;
}

/* Well-formed UTF-8 without NUL; controls allowed (JSON whitespace). */
static bool body_text_ok(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    uint32_t cp;
    for (size_t i = 0; i < len;) {
        if (u[i] == 0) return false;
        size_t n = utf8_decode(u, i, len, &cp);
        if (!n) return false;
        i += n;
    }
    return true;
}

long validate_utf8_text(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    long count = 0;
    uint32_t cp;
    for (size_t i = 0; i < len;) {
        size_t n = utf8_decode(u, i, len, &cp);
        if (!n) return -1;
        if (cp < 0x20 || cp == 0x7F) return -1; /* NUL, other C0 controls, DEL */
        i += n;
        count++;
    }
    return count;
}

bool validate_event_id(const char *s, size_t len)
{
    if (!s || len < 1 || len > EVENT_ID_MAX_CHARS) return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok) return false;
    }
    return true;
}

int validate_phone(const char *in, size_t len, char out[PHONE_DIGITS_MAX + 1])
{
    /* Digits in up to three groups separated by single '-' or ' ': 01X, 3-4 digits, 4 digits;
     * or all digits with no separator. */
    size_t groups[3], ngroups = 0, cur = 0, ndigits = 0;
    char digits[PHONE_DIGITS_MAX + 1];

    if (!in || len == 0 || len > 13) return -1; /* "010-1234-5678" is the longest form */
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c >= '0' && c <= '9') {
            if (ndigits >= PHONE_DIGITS_MAX) return -1;
            digits[ndigits++] = c;
            cur++;
        } else if (c == '-' || c == ' ') {
            if (cur == 0 || ngroups >= 2) return -1; /* leading, doubled or too many */
            groups[ngroups++] = cur;
            cur = 0;
        } else {
            return -1;
        }
    }
    if (cur == 0) return -1; /* trailing separator */
    groups[ngroups++] = cur;
    if (ngroups == 2) return -1;
    if (ngroups == 3 && (groups[0] != 3 || groups[1] < 3 || groups[1] > 4 || groups[2] != 4))
        return -1;
    if (ndigits != 10 && ndigits != 11) return -1;
    if (digits[0] != '0' || digits[1] != '1' || !strchr("016789", digits[2])) return -1;
    if (digits[2] == '0' && ndigits != 11) return -1; /* 010 numbers always have 8 digits */
    memcpy(out, digits, ndigits);
    out[ndigits] = '\0';
    return 0;
}

/* A sane address, not full RFC 5322: one '@', a non-empty local part (<= 64 bytes) of
 * printable characters without specials, a domain of non-empty dot-separated labels with at
 * least one dot, letters/digits/'-' (or non-ASCII) only. */
static bool email_ok(const char *s, size_t len)
{
    if (len < 3 || len > EMAIL_MAX_BYTES) return false;
    if (validate_utf8_text(s, len) < 0) return false;
    const char *at = memchr(s, '@', len);
    if (!at || memchr(at + 1, '@', len - (size_t)(at - s) - 1)) return false;
    size_t local_len = (size_t)(at - s);
    if (local_len == 0 || local_len > 64) return false;
    for (size_t i = 0; i < local_len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c == 0x7F || strchr("\"(),:;<>[\\]", c)) return false;
    }
    if (s[0] == '.' || s[local_len - 1] == '.') return false;
    const char *dom = at + 1;
    size_t dom_len = len - local_len - 1;
    if (dom_len < 3 || !memchr(dom, '.', dom_len)) return false;
    size_t label = 0;
    for (size_t i = 0; i < dom_len; i++) {
        unsigned char c = (unsigned char)dom[i];
        if (c == '.') {
            if (label == 0 || dom[i - 1] == '-') return false;
            label = 0;
            continue;
        }
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c >= 0x80 || (c == '-' && label > 0);
        if (!ok) return false;
        label++;
    }
    return label > 0 && dom[dom_len - 1] != '-';
}

/* A string member: sets s, len and present, or reports a missing/wrong-typed field. */
static int get_string(json_object *obj, const char *key, bool required, const char **s,
                      size_t *len, bool *present, struct field_error *err)
{
    json_object *v;
    *present = false;
    if (!json_object_object_get_ex(obj, key, &v) || v == NULL) {
        if (required) return fail(err, key, "is required");
        return 0;
    }
    if (!json_object_is_type(v, json_type_string)) return fail(err, key, "must be a string");
    *s = json_object_get_string(v);
    *len = (size_t)json_object_get_string_len(v);
    *present = true;
    return 0;
}

static int check_fields(json_object *obj, struct application_in *out, struct field_error *err)
{
    const char *s = NULL;
    size_t len = 0;
    bool present;

    /* event_id */
    if (get_string(obj, "event_id", true, &s, &len, &present, err)) return -1;
    if (!validate_event_id(s, len))
        return fail(err, "event_id", "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-'");
    memcpy(out->event_id, s, len);
    out->event_id[len] = '\0';

    /* phone */
    if (get_string(obj, "phone", true, &s, &len, &present, err)) return -1;
    if (validate_phone(s, len, out->phone))
        return fail(err, "phone", "must be a Korean mobile number like 010-1234-5678");

    /* name: trimmed of surrounding spaces; whitespace only counts as empty */
    if (get_string(obj, "name", true, &s, &len, &present, err)) return -1;
    if (validate_utf8_text(s, len) < 0)
        return fail(err, "name", "must be valid UTF-8 text without control characters");
    while (len > 0 && s[0] == ' ') s++, len--;
    while (len > 0 && s[len - 1] == ' ') len--;
    long chars = validate_utf8_text(s, len);
    if (chars < 1 || chars > NAME_MAX_CHARS || len > NAME_MAX_BYTES)
        return fail(err, "name", "must be 1-100 characters");
    memcpy(out->name, s, len);
    out->name[len] = '\0';

    /* email: optional; null, absent or "" mean none */
    out->email[0] = '\0';
    if (get_string(obj, "email", false, &s, &len, &present, err)) return -1;
    if (present && len > 0) {
        if (!email_ok(s, len))
            return fail(err, "email", "must be an e-mail address like name@example.com");
        memcpy(out->email, s, len);
        out->email[len] = '\0';
    }

    /* seats: optional JSON integer 1..4 (2.0, "2", true are rejected), default 1 */
    out->seats = 1;
    json_object *v;
    if (json_object_object_get_ex(obj, "seats", &v) && v != NULL) {
        if (!json_object_is_type(v, json_type_int))
            return fail(err, "seats", "must be an integer from 1 to 4");
        int64_t n = json_object_get_int64(v);
        if (n < SEATS_MIN || n > SEATS_MAX)
            return fail(err, "seats", "must be an integer from 1 to 4");
        out->seats = (int)n;
    }
    return 0;
}

int validate_application(const char *body, size_t len, struct application_in *out,
                         struct field_error *err)
{
    if (!body || len == 0) return fail(err, "body", "must be a JSON object");
    if (len > INT32_MAX) return fail(err, "body", "is too large");
    if (memchr(body, '\0', len)) return fail(err, "body", "must not contain NUL bytes");
    if (!body_text_ok(body, len)) return fail(err, "body", "must be valid UTF-8");

    struct json_tokener *tok = json_tokener_new_ex(JSON_MAX_DEPTH);
    if (!tok) return fail(err, "body", "could not be parsed");
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);

    int rc = -1;
    json_object *obj = json_tokener_parse_ex(tok, body, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    if (jerr == json_tokener_continue) {
        /* Top-level numbers and truncated documents end up here; neither is an object. */
        rc = fail(err, "body", "must be a complete JSON object");
        goto out;
    }
    if (!obj || jerr != json_tokener_success) {
        rc = fail(err, "body", "must be valid JSON");
        goto out;
    }
    for (size_t i = json_tokener_get_parse_end(tok); i < len; i++) {
        char c = body[i];
        if (c != ' ' && c != '\t' && c != '\r' && c != '\n') {
            rc = fail(err, "body", "must contain nothing after the JSON object");
            goto out;
        }
    }
    if (!json_object_is_type(obj, json_type_object)) {
        rc = fail(err, "body", "must be a JSON object");
        goto out;
    }
    memset(out, 0, sizeof *out);
    rc = check_fields(obj, out, err);
out:
    json_object_put(obj);
    json_tokener_free(tok);
    return rc;
}

void validate_fingerprint(const struct application_in *app, char hex[VALIDATE_FINGERPRINT_HEX + 1])
{
    char canon[sizeof app->event_id + sizeof app->phone + sizeof app->name + sizeof app->email + 16];
    int n = snprintf(canon, sizeof canon, "%s%c%s%c%s%c%s%c%d", app->event_id, 0, app->phone, 0,
                     app->name, 0, app->email, 0, app->seats);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    static const char digits[] = "0123456789abcdef";
    if (n < 0 || (size_t)n >= sizeof canon || !EVP_Digest(canon, (size_t)n, md, &mdlen, EVP_sha256(), NULL) ||
        mdlen != VALIDATE_FINGERPRINT_HEX / 2) {
        memset(hex, '0', VALIDATE_FINGERPRINT_HEX); /* cannot happen; never matches a real one */
        mdlen = 0;
    }
    for (unsigned int i = 0; i < mdlen; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    hex[VALIDATE_FINGERPRINT_HEX] = '\0';
}
