/* limits: every fixed size cap in one place (curl's DYN_* habit). Caps that operators tune
 * are settings in config.c; these are the ones that shape data structures. */
#ifndef TICKETD_LIMITS_H
#define TICKETD_LIMITS_H

#define EVENT_ID_MAX_CHARS 64        /* [A-Za-z0-9._-]{1,64} */
#define NAME_MAX_CHARS 100           /* UTF-8 code points */
#define NAME_MAX_BYTES (NAME_MAX_CHARS * 4)
#define EMAIL_MAX_BYTES 254          /* RFC 5321 path limit */
#define PHONE_DIGITS_MAX 11          /* 01X + 3..4 + 4 digits */
#define SEATS_MIN 1
#define SEATS_MAX 4
#define IDEMPOTENCY_KEY_MAX_BYTES 128
#define REQUEST_BODY_MAX_DEFAULT (16 * 1024)   /* SPEC: bodies over 16 KiB -> 413 */
#define UUID_STR_LEN 36
#define STRBUF_MAX_DEFAULT ((size_t)64 * 1024 * 1024) /* a strbuf without its own cap */

#endif
