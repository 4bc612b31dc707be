/* libFuzzer target: the application JSON validator. Anything it accepts must satisfy the
 * contract of validate.h (what PostgreSQL will store as is), so the fuzzer checks that too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "validate.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A copy of exactly size bytes, so reads past the end are caught by ASan. */
    char *body = malloc(size ? size : 1);
    if (!body) return 0;
    if (size) memcpy(body, data, size);

    struct application_in app;
    struct field_error err;
    if (validate_application(body, size, &app, &err) == 0) {
        size_t elen = strlen(app.event_id), nlen = strlen(app.name), mlen = strlen(app.email);
        char phone[PHONE_DIGITS_MAX + 1];
        if (!validate_event_id(app.event_id, elen)) abort();
        if (validate_phone(app.phone, strlen(app.phone), phone) != 0 || strcmp(phone, app.phone))
            abort();
        long chars = validate_utf8_text(app.name, nlen);
        if (chars < 1 || chars > NAME_MAX_CHARS) abort();
        if (mlen > EMAIL_MAX_BYTES || validate_utf8_text(app.email, mlen) < 0) abort();
        if (app.seats < SEATS_MIN || app.seats > SEATS_MAX) abort();
    } else {
        if (!memchr(err.field, '\0', sizeof err.field) || !err.field[0]) abort();
        if (!memchr(err.message, '\0', sizeof err.message) || !err.message[0]) abort();
    }
    free(body);
    return 0;
}
