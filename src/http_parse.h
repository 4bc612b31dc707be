/* http_parse: the transport-free core of http_server (one HTTP/1.1 session per connection).
 *
 * A session turns bytes into requests (llhttp), hands each complete request to the handler,
 * keeps them in arrival order and turns answered ones into response bytes, strictly in that
 * order. It never touches a socket: the owner (http_server.c, or the fuzz target) feeds
 * input, collects output buffers, reports when they are written, and closes when the session
 * says it is finished. Limits (431, 413, 400) are enforced while parsing; the owner adds
 * the timers (408, idle) and the connection count (503).
 *
 * Lifetimes: requests live in the session's queue from their first byte until their
 * response is written (http_session_written). A request handed to the handler and not yet
 * answered when the owner goes away (http_session_detach) becomes an orphan: http_respond
 * then frees it, and env->released(s) tells the owner when the last orphan of s is gone. */
#ifndef TICKETD_HTTP_PARSE_H
#define TICKETD_HTTP_PARSE_H

#include <llhttp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "http_server.h"

struct http_req;     /* private: a struct http_request plus its arena and queue links */
struct http_session;

/* Shared by the sessions of one server; outlives all of them. */
struct http_env {
    struct http_limits limits;
    http_handler_fn handler;
    void *handler_ud;
    /* The request at the front of s's unsent output was answered (called from
     * http_respond, possibly inside http_session_feed): the owner should collect soon. */
    void (*output_ready)(struct http_session *s);
    /* s was detached and its last orphaned request was answered: the owner may free s. */
    void (*released)(struct http_session *s);
    bool draining;              /* new requests get "Connection: close" */
    unsigned pending;           /* handed to the handler and not answered (all sessions) */
    struct http_req *free_reqs; /* small cache of request objects */
    unsigned nfree;
};

/* Where a session stands, for the owner's timers. */
enum http_phase {
    HTTP_PHASE_IDLE, /* nothing queued, nothing partial: keep-alive idle */
    HTTP_PHASE_HEAD, /* a request head is arriving (header timeout) */
    HTTP_PHASE_BODY, /* a request body is arriving */
    HTTP_PHASE_BUSY  /* requests queued (with the handler or waiting to be written) */
};

struct http_session {
    llhttp_t parser;
    struct http_env *env;
    void *owner;
    struct http_req *head, *tail; /* queue, oldest first */
    struct http_req *unsent;      /* first request whose response is not yet collected */
    struct http_req *cur;         /* request being parsed (the tail), or NULL */
    unsigned queued;              /* requests in the queue, cur included */
    unsigned unanswered;          /* handed to the handler, not answered */
    unsigned refs;                /* handed to the handler, not answered (orphans included) */
    uint64_t messages;            /* request heads begun so far */
    /* head being parsed: URL and captured header values, bounded by max_header_bytes */
    char *scratch;
    size_t scratch_len, scratch_cap, url_len;
    size_t head_bytes;
    unsigned nheaders;
    char field[20];
    size_t field_len;
    int capture;                  /* index into hdr[] of the value being read, or -1 */
    struct { size_t off, len; bool set; } hdr[4];
    int error_status;             /* set by a callback that failed the request */
    bool head_done, paused, input_closed, detached;
    bool failed;                  /* answered with an error: the client may still be sending */
    bool eof_after_pending;       /* EOF seen while input was held back */
    /* input received while paused for pipelining (at most one read) */
    char *pending_in;
    size_t pending_len, pending_cap;
};

void http_session_init(struct http_session *s, struct http_env *env, void *owner);

/* Parses len bytes; the handler may run (and answer) inside. Input after an error, after a
 * request that closes the connection, or after http_session_input_close is discarded. */
void http_session_feed(struct http_session *s, const char *data, size_t len);

/* True when at most max_pipelined requests may be queued and parsing stopped: the owner
 * should stop reading until http_session_resume has unpaused it. */
static inline bool http_session_paused(const struct http_session *s) { return s->paused; }

/* Parses the input held back while paused, if the queue has room again. */
void http_session_resume(struct http_session *s);

/* No more input will be parsed (EOF, server shutdown): a partial request is dropped;
 * queued requests are still answered and written. */
void http_session_input_close(struct http_session *s);

/* The client will send nothing more (EOF): like http_session_input_close, but complete
 * requests still held back by a pipelining pause are parsed and answered first. */
void http_session_eof(struct http_session *s);

/* Answers the request being parsed (or a new one) with status and stops parsing:
 * 408 on header timeout, 503 for a connection over the limit. */
void http_session_fail(struct http_session *s, int status);

/* Fills bufs (at most max) with the next response bytes in order and stores in *nreqs how
 * many requests they complete. The buffers stay valid until http_session_written(nreqs). */
unsigned http_session_collect(struct http_session *s, uv_buf_t *bufs, unsigned max,
                              unsigned *nreqs);

/* The first n collected requests are written: frees them. */
void http_session_written(struct http_session *s, unsigned n);

/* Input is closed and every queued response is written: the owner should close. */
static inline bool http_session_finished(const struct http_session *s)
{
    return s->input_closed && s->head == NULL;
}

enum http_phase http_session_phase(const struct http_session *s);

/* The owner is gone (call only once no collected buffer is in flight). Frees what nobody
 * holds, orphans requests still with the handler. Returns true when s may be freed now;
 * otherwise env->released(s) comes later. */
bool http_session_detach(struct http_session *s);

/* Frees the session's own buffers (after detach returned true or released fired). */
void http_session_destroy(struct http_session *s);

/* Frees the env's request cache (after every session is destroyed). */
void http_env_cleanup(struct http_env *env);

#endif
