/* validate: the application body (JSON) -> a checked struct, with a field-level error.
 * Pure functions, no I/O: unit-tested and fuzzed. Everything accepted here must be
 * storable by PostgreSQL as is (valid UTF-8, no NUL), because one bad row would fail a
 * whole group-commit batch. */
#ifndef TICKETD_VALIDATE_H
#define TICKETD_VALIDATE_H

#include <stdbool.h>
#include <stddef.h>

#include "limits.h"

struct application_in {
    char event_id[EVENT_ID_MAX_CHARS + 1];
    char phone[PHONE_DIGITS_MAX + 1];   /* normalised: digits only */
    char name[NAME_MAX_BYTES + 1];      /* UTF-8, 1..100 code points, no control chars */
    char email[EMAIL_MAX_BYTES + 1];    /* "" when absent */
    int seats;                          /* 1..4, default 1 */
};

struct field_error {
    char field[32];    /* "event_id", "phone", "name", "email", "seats", or "body" */
    char message[160]; /* human-readable, safe to echo back */
};

/* Parses and validates a JSON body. Returns 0 and fills out, or -1 and fills err.
 * Unknown fields are ignored; wrong types, missing required fields, invalid UTF-8,
 * trailing garbage and non-object bodies are errors. */
int validate_application(const char *body, size_t len, struct application_in *out,
                         struct field_error *err);

/* "010-1234-5678", "01012345678", "010 1234 5678" -> "01012345678". Korean mobile numbers
 * only: 01[016789], then 3 or 4 digits, then 4 digits. Returns 0, or -1 if not a mobile. */
int validate_phone(const char *in, size_t len, char out[PHONE_DIGITS_MAX + 1]);

bool validate_event_id(const char *s, size_t len);

/* The Idempotency-Key fingerprint of a validated application: SHA-256 over its normalised
 * fields (event_id, phone digits, name, email, seats; NUL-separated, so unambiguous), as 64
 * lowercase hex digits. Equal bodies in any spelling (phone format, key order, whitespace,
 * seats omitted vs 1) give the same fingerprint. */
#define VALIDATE_FINGERPRINT_HEX 64
void validate_fingerprint(const struct application_in *app, char hex[VALIDATE_FINGERPRINT_HEX + 1]);

/* Well-formed UTF-8 (no overlongs, no surrogates) with no NUL or other C0 control; returns
 * the number of code points, or -1. */
long validate_utf8_text(const char *s, size_t len);

#endif
