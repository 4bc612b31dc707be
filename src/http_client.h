/* http_client (hc_): outgoing HTTP and SMTP through libcurl's multi interface, driven by
 * the loop. CURLMOPT_SOCKETFUNCTION maps each curl socket to a uv_poll_t,
 * CURLMOPT_TIMERFUNCTION to one uv_timer_t; curl_multi_socket_action runs from those
 * callbacks only, so nothing here blocks (name resolution uses curl's threaded resolver).
 *
 * Every request has a total timeout; its completion callback runs exactly once, always on a
 * later loop turn (never from inside hc_post_json/hc_smtp_send). */
#ifndef TICKETD_HTTP_CLIENT_H
#define TICKETD_HTTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct hc;

struct hc_result {
    int curl_code;          /* CURLcode; 0 = the exchange completed (look at status) */
    long status;            /* HTTP status, or the last SMTP reply code; 0 if none */
    const char *error;      /* curl's error text, "" when curl_code == 0 */
    const char *body;       /* response body (HTTP), truncated to HC_BODY_MAX, NUL-terminated */
    size_t body_len;
};

/* The result (and everything it points to) is valid only during the call. */
typedef void (*hc_done_fn)(void *ud, const struct hc_result *res);

/* Returns 0 or -errno. */
int hc_create(struct hc **out, uv_loop_t *loop);

/* POST body (copied) as JSON to url. headers: NULL or an array of nheaders complete header
 * lines ("Idempotency-Key: x"), copied. Returns 0 when started (cb will run), or -errno
 * (cb will not run). */
int hc_post_json(struct hc *h, const char *url, const char *const *headers, size_t nheaders,
                 const char *content_type, const char *body, size_t len, int64_t timeout_ms,
                 hc_done_fn cb, void *ud);

/* Sends one message (RFC 5322 text with CRLF line ends, copied) from `from` to `rcpt` over
 * SMTP at url (smtp://host:port, smtps://...). Success is curl_code == 0.
 * require_tls: smtps:// is TLS from the start; on smtp:// STARTTLS is required
 * (CURLUSESSL_ALL) and a server that does not offer it fails the call before AUTH, MAIL FROM
 * or RCPT TO are sent. Without it, STARTTLS is used when offered (a local test server). */
int hc_smtp_send(struct hc *h, const char *url, bool require_tls, const char *from,
                 const char *rcpt, const char *message, size_t len, int64_t timeout_ms,
                 hc_done_fn cb, void *ud);

/* Requests started and not finished. */
unsigned hc_inflight(const struct hc *h);

/* Aborts requests still running (their callbacks run with curl_code CURLE_ABORTED_BY_CALLBACK
 * and error "closing", before hc_close returns), closes the handles and calls done(ud) on a
 * later turn, then frees. */
void hc_close(struct hc *h, void (*done)(void *ud), void *ud);

#endif
