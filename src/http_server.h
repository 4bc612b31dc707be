/* http_server: HTTP/1.1 over libuv TCP, parsed by llhttp.
 *
 * Keep-alive; pipelined requests are answered in order (a response is written only once all
 * earlier ones on the connection are); limits on connections, header bytes and count (431),
 * body size (413), a header timeout (slowloris), a whole-request deadline (slow bodies) and a
 * keep-alive idle timeout. Errors the layer answers itself: 400 (malformed), 413, 431, 408
 * (header timeout, request deadline), 503 (too many connections, when overflow_reject).
 * Chunked request bodies are decoded.
 *
 * Ownership: the server owns each struct http_request. The handler must call http_respond()
 * exactly once per request, now or later (after a DB round trip); the request and everything
 * allocated with http_request_alloc() stays valid until then, even if the client has gone
 * (the response is then discarded). */
#ifndef TICKETD_HTTP_SERVER_H
#define TICKETD_HTTP_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct http_server;

struct http_request {
    /* read-only for the handler */
    uint64_t id;                /* process-unique, for logs */
    int method;                 /* llhttp_method_t: HTTP_GET, HTTP_POST, ... */
    const char *path;           /* NUL-terminated, without the query */
    size_t path_len;
    const char *query;          /* NUL-terminated, after '?', "" if none (not decoded) */
    const char *body;           /* NUL-terminated copy (decoded if chunked) */
    size_t body_len;
    const char *content_type;   /* header values, NUL-terminated, NULL when absent */
    const char *authorization;
    const char *idempotency_key;
    uint64_t start_ns;          /* uv_hrtime() when the head was complete */
    /* free for the handler */
    void *handler_data;
};

typedef void (*http_handler_fn)(struct http_request *req, void *ud);

struct http_limits {
    int max_connections;
    int max_header_bytes;
    int max_headers;
    int max_body_bytes;
    int max_pipelined;          /* parsed-but-unanswered requests per connection before reading pauses */
    uint64_t idle_timeout_ms;
    uint64_t header_timeout_ms;
    uint64_t request_timeout_ms;  /* first byte of a head to the end of its body; 0 = none */
    bool overflow_reject;         /* over max_connections: 503 and close (else stop accepting) */
};

/* Binds "host:port" (port 0 picks one; see http_server_port) and starts accepting.
 * Returns 0 or a negative libuv error. */
int http_server_start(struct http_server **out, uv_loop_t *loop, const char *listen,
                      const struct http_limits *limits, http_handler_fn handler, void *ud);

int http_server_port(const struct http_server *s);

/* Answers req. extra_headers is NULL or complete lines ("Retry-After: 1\r\n"). The body is
 * copied. After this call req must not be touched. */
void http_respond(struct http_request *req, int status, const char *content_type,
                  const char *body, size_t len, const char *extra_headers);

/* Memory that lives exactly as long as req (freed after http_respond). Never NULL (aborts on OOM). */
void *http_request_alloc(struct http_request *req, size_t n);

/* Graceful shutdown, step 1: stop accepting; new requests on open connections get
 * "Connection: close". */
void http_server_stop_accepting(struct http_server *s);

/* Requests received and not yet answered. */
unsigned http_server_pending(const struct http_server *s);

/* Step 2: closes idle connections now, the others once their answered responses are
 * written; calls done(ud) when every connection is closed and frees the server. Requests
 * still unanswered keep their connection open until answered. */
void http_server_close(struct http_server *s, void (*done)(void *ud), void *ud);

const char *http_status_text(int status);

/* Raises RLIMIT_NOFILE's soft limit to the hard limit (each connection is a descriptor) and
 * logs both; warns when max_connections does not fit. Called by http_server_start. */
void http_raise_fd_limit(int max_connections);

#endif
