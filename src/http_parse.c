/* http_parse: transport-free HTTP/1.1 session core (see http_parse.h). */
#include "http_parse.h"

#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "limits.h"
#include "log.h"

/* Bytes of arena inside each request object: enough for the head copies and a small
 * response, so a typical request never mallocs. */
#define HTTP_ARENA_ALIGN 16

enum { HDR_CONTENT_TYPE, HDR_AUTHORIZATION, HDR_IDEMPOTENCY_KEY, HDR_EXPECT };

enum req_state {
    REQ_PARSING, /* being received; the handler has not seen it */
    REQ_HANDLER, /* handed to the handler, not answered */
    REQ_READY,   /* response formatted, waiting for its turn / its write */
    REQ_ORPHAN   /* with the handler, but the connection is gone */
};

struct arena_block {
    struct arena_block *next;
    alignas(HTTP_ARENA_ALIGN) char data[];
};

struct http_req {
    struct http_request pub; /* first: the handler's pointer is ours */
    struct http_session *s;
    struct http_req *next;
    const char *out;         /* formatted response */
    size_t out_len;
    enum req_state state;
    bool close_after;        /* "Connection: close", the session stops after it */
    bool head_method;
    bool want_continue, continue_sent;
    char *body_buf;
    size_t body_cap;
    char *a_ptr;             /* arena: bump pointer into inline_mem or the current block */
    size_t a_left;
    struct arena_block *blocks;
    alignas(HTTP_ARENA_ALIGN) char inline_mem[HTTP_REQ_INLINE_BYTES];
};

static const char continue_line[] = "HTTP/1.1 100 Continue\r\n\r\n";
static uint64_t next_request_id = 1;

/* ---- request objects and their arena ---- */

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        log_error("http", "event=oom bytes=%zu", n);
        abort();
    }
    return p;
}

static struct http_req *req_new(struct http_session *s)
{
    struct http_env *env = s->env;
    struct http_req *r = env->free_reqs;
    if (r) {
        env->free_reqs = r->next;
        env->nfree--;
    } else {
        r = xmalloc(sizeof *r);
    }
    memset(r, 0, offsetof(struct http_req, inline_mem));
    r->s = s;
    r->state = REQ_PARSING;
    r->a_ptr = r->inline_mem;
    r->a_left = sizeof r->inline_mem;
    r->pub.id = next_request_id++;
    r->pub.path = "";
    r->pub.query = "";
    r->pub.body = "";
    return r;
}

static void req_free(struct http_env *env, struct http_req *r)
{
    struct arena_block *b = r->blocks;
    while (b) {
        struct arena_block *next = b->next;
        free(b);
        b = next;
    }
    if (env->nfree < HTTP_REQ_CACHE_MAX) {
        r->next = env->free_reqs;
        env->free_reqs = r;
        env->nfree++;
    } else {
        free(r);
    }
}

void *http_request_alloc(struct http_request *req, size_t n)
{
    struct http_req *r = (struct http_req *)req;
    size_t need = (n + HTTP_ARENA_ALIGN - 1) & ~(size_t)(HTTP_ARENA_ALIGN - 1);
    if (need == 0) need = HTTP_ARENA_ALIGN;
    if (need <= r->a_left) {
        void *p = r->a_ptr;
        r->a_ptr += need;
        r->a_left -= need;
        return p;
    }
    if (need > HTTP_ARENA_BLOCK_BYTES / 2) {
        /* Large: a block of its own, the current block keeps serving small ones. */
        struct arena_block *b = xmalloc(sizeof *b + need);
        b->next = r->blocks;
        r->blocks = b;
        return b->data;
    }
    struct arena_block *b = xmalloc(sizeof *b + HTTP_ARENA_BLOCK_BYTES);
    b->next = r->blocks;
    r->blocks = b;
    r->a_ptr = b->data + need;
    r->a_left = HTTP_ARENA_BLOCK_BYTES - need;
    return b->data;
}

static char *req_strdup(struct http_req *r, const char *p, size_t n)
{
    char *d = http_request_alloc(&r->pub, n + 1);
    memcpy(d, p, n);
    d[n] = '\0';
    return d;
}

/* ---- queue ---- */

static void queue_append(struct http_session *s, struct http_req *r)
{
    r->next = NULL;
    if (s->tail) s->tail->next = r;
    else s->head = r;
    s->tail = r;
    if (!s->unsent) s->unsent = r;
    s->queued++;
}

/* Removes the tail (the request being parsed). */
static void queue_drop_tail(struct http_session *s)
{
    struct http_req *t = s->tail, *p = NULL;
    for (struct http_req *q = s->head; q != t; q = q->next) p = q;
    if (p) p->next = NULL;
    else s->head = NULL;
    s->tail = p;
    if (s->unsent == t) s->unsent = NULL;
    s->queued--;
    req_free(s->env, t);
}

/* ---- responses ---- */

const char *http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 200 ? "Informational" : status < 300 ? "Success"
                  : status < 400 ? "Redirection" : status < 500 ? "Client Error" : "Server Error";
    }
}

static size_t put_str(char *out, size_t at, const char *s, size_t n)
{
    memcpy(out + at, s, n);
    return at + n;
}

static size_t put_uint(char *out, size_t at, unsigned long long v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) out[at++] = tmp[--n];
    return at;
}

static void format_response(struct http_req *r, int status, const char *content_type,
                            const char *body, size_t len, const char *extra)
{
    /* 1xx, 204 and 304 carry neither Content-Length nor a body; HEAD gets the length only. */
    bool no_length = (status >= 100 && status < 200) || status == 204 || status == 304;
    size_t body_out = (no_length || r->head_method) ? 0 : len;
    size_t ct_len = content_type ? strlen(content_type) : 0;
    size_t extra_len = extra ? strlen(extra) : 0;
    size_t cap = 128 + ct_len + extra_len;
    char *out = http_request_alloc(&r->pub, cap + body_out);
    /* Built by hand: this runs once per response, and snprintf was a tenth of the
     * per-request instructions (docs/PERFORMANCE.md). */
    size_t at = 0;
    at = put_str(out, at, "HTTP/1.1 ", 9);
    at = put_uint(out, at, (unsigned long long)(status >= 100 && status <= 999 ? status : 500));
    out[at++] = ' ';
    const char *text = http_status_text(status);
    at = put_str(out, at, text, strlen(text));
    at = put_str(out, at, "\r\n", 2);
    if (content_type) {
        at = put_str(out, at, "Content-Type: ", 14);
        at = put_str(out, at, content_type, ct_len);
        at = put_str(out, at, "\r\n", 2);
    }
    if (!no_length) {
        at = put_str(out, at, "Content-Length: ", 16);
        at = put_uint(out, at, (unsigned long long)len);
        at = put_str(out, at, "\r\n", 2);
    }
    if (r->close_after) {
        memcpy(out + at, "Connection: close\r\n", 19);
        at += 19;
    }
    if (extra_len) {
        memcpy(out + at, extra, extra_len);
        at += extra_len;
    }
    out[at++] = '\r';
    out[at++] = '\n';
    if (body_out) {
        memcpy(out + at, body, body_out);
        at += body_out;
    }
    r->out = out;
    r->out_len = at;
    r->state = REQ_READY;
}

void http_respond(struct http_request *req, int status, const char *content_type,
                  const char *body, size_t len, const char *extra_headers)
{
    struct http_req *r = (struct http_req *)req;
    struct http_session *s = r->s;
    struct http_env *env = s->env;
    if (r->state != REQ_HANDLER && r->state != REQ_ORPHAN) {
        log_error("http", "event=respond_twice req=%llu status=%d",
                  (unsigned long long)req->id, status);
        return;
    }
    env->pending--;
    s->refs--;
    if (r->state == REQ_ORPHAN) {
        /* The client is gone: discard; the last orphan lets the owner free the session. */
        req_free(env, r);
        if (s->refs == 0 && env->released) env->released(s);
        return;
    }
    s->unanswered--;
    format_response(r, status, content_type, body, len, extra_headers);
    if (r == s->unsent && env->output_ready) env->output_ready(s);
}

static const char *error_body(int status)
{
    switch (status) {
    case 408: return "{\"error\":\"request_timeout\"}";
    case 413: return "{\"error\":\"body_too_large\"}";
    case 431: return "{\"error\":\"headers_too_large\"}";
    case 503: return "{\"error\":\"too_many_connections\"}";
    default: return "{\"error\":\"bad_request\"}";
    }
}

void http_session_fail(struct http_session *s, int status)
{
    if (s->detached) return;
    struct http_req *r = s->cur;
    if (!r) {
        if (s->input_closed) return; /* already failing or closing: nothing more to say */
        r = req_new(s);
        queue_append(s, r);
    }
    s->cur = NULL;
    s->head_done = false;
    s->input_closed = true;
    s->failed = true;
    r->close_after = true;
    r->head_method = false;
    const char *body = error_body(status);
    format_response(r, status, "application/json", body, strlen(body),
                    status == 503 ? "Retry-After: 1\r\n" : NULL);
    log_debug("http", "event=request_rejected status=%d", status);
    if (r == s->unsent && s->env->output_ready) s->env->output_ready(s);
}

/* ---- llhttp callbacks ---- */

#define SESSION(p) ((struct http_session *)(p)->data)

static int fail_in_cb(struct http_session *s, int status)
{
    s->error_status = status;
    return HPE_USER;
}

static int scratch_append(struct http_session *s, const char *at, size_t len)
{
    if (s->scratch_len + len > s->scratch_cap) {
        size_t cap = s->scratch_cap ? s->scratch_cap : 512;
        while (cap < s->scratch_len + len) cap *= 2;
        char *p = realloc(s->scratch, cap);
        if (!p) {
            log_error("http", "event=oom bytes=%zu", cap);
            abort();
        }
        s->scratch = p;
        s->scratch_cap = cap;
    }
    memcpy(s->scratch + s->scratch_len, at, len);
    s->scratch_len += len;
    return 0;
}

/* Header bytes counted: method, target, version, names and values, plus 4 per header for
 * ": " and CRLF. Optional whitespace is not buffered, so it is not counted. */
static int count_head(struct http_session *s, size_t len)
{
    s->head_bytes += len;
    if (s->head_bytes > (size_t)s->env->limits.max_header_bytes) return fail_in_cb(s, 431);
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    struct http_session *s = SESSION(p);
    if (s->input_closed) return HPE_PAUSED;
    struct http_req *r = req_new(s);
    queue_append(s, r);
    s->cur = r;
    s->messages++;
    s->scratch_len = 0;
    s->url_len = 0;
    s->head_bytes = 0;
    s->nheaders = 0;
    s->field_len = 0;
    s->capture = -1;
    memset(s->hdr, 0, sizeof s->hdr);
    s->error_status = 0;
    s->head_done = false;
    return 0;
}

static int on_method(llhttp_t *p, const char *at, size_t len)
{
    (void)at;
    return count_head(SESSION(p), len);
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    struct http_session *s = SESSION(p);
    if (count_head(s, len)) return HPE_USER;
    s->url_len += len;
    return scratch_append(s, at, len);
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct http_session *s = SESSION(p);
    if (count_head(s, len)) return HPE_USER;
    /* Only short names matter (the ones captured); longer ones just overflow the count. */
    for (size_t i = 0; i < len && s->field_len < sizeof s->field; i++) s->field[s->field_len++] = at[i];
    if (s->field_len < sizeof s->field) return 0;
    s->field_len = sizeof s->field; /* marks "too long to be interesting" */
    return 0;
}

static bool field_is(const struct http_session *s, const char *name)
{
    size_t n = strlen(name);
    return s->field_len == n && strncasecmp(s->field, name, n) == 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    struct http_session *s = SESSION(p);
    /* ": " and CRLF, counted once per header however the name was split across reads */
    if (++s->nheaders > (unsigned)s->env->limits.max_headers || count_head(s, 4)) {
        s->error_status = 431;
        return -1;
    }
    int idx = -1;
    if (field_is(s, "content-type")) idx = HDR_CONTENT_TYPE;
    else if (field_is(s, "authorization")) idx = HDR_AUTHORIZATION;
    else if (field_is(s, "idempotency-key")) idx = HDR_IDEMPOTENCY_KEY;
    else if (field_is(s, "expect")) idx = HDR_EXPECT;
    s->field_len = 0;
    /* Only the first occurrence of each is kept. */
    s->capture = (idx >= 0 && !s->hdr[idx].set) ? idx : -1;
    if (s->capture >= 0) {
        s->hdr[idx].set = true;
        s->hdr[idx].off = s->scratch_len;
        s->hdr[idx].len = 0;
    }
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct http_session *s = SESSION(p);
    if (count_head(s, len)) return HPE_USER;
    if (s->capture < 0) return 0;
    s->hdr[s->capture].len += len;
    return scratch_append(s, at, len);
}

static int on_header_value_complete(llhttp_t *p)
{
    struct http_session *s = SESSION(p);
    if (s->capture >= 0) {
        /* Trailing whitespace is not part of the value. */
        size_t off = s->hdr[s->capture].off, n = s->hdr[s->capture].len;
        while (n > 0 && (s->scratch[off + n - 1] == ' ' || s->scratch[off + n - 1] == '\t')) n--;
        s->hdr[s->capture].len = n;
    }
    s->capture = -1;
    return 0;
}

static const char *captured(struct http_session *s, struct http_req *r, int idx)
{
    if (!s->hdr[idx].set) return NULL;
    return req_strdup(r, s->scratch + s->hdr[idx].off, s->hdr[idx].len);
}

static int on_headers_complete(llhttp_t *p)
{
    struct http_session *s = SESSION(p);
    struct http_req *r = s->cur;
    const struct http_limits *lim = &s->env->limits;

    const char *url = s->scratch;
    const char *q = url ? memchr(url, '?', s->url_len) : NULL;
    size_t path_len = q ? (size_t)(q - url) : s->url_len;
    r->pub.path = req_strdup(r, url ? url : "", path_len);
    r->pub.path_len = path_len;
    r->pub.query = q ? req_strdup(r, q + 1, s->url_len - path_len - 1) : "";
    r->pub.content_type = captured(s, r, HDR_CONTENT_TYPE);
    r->pub.authorization = captured(s, r, HDR_AUTHORIZATION);
    r->pub.idempotency_key = captured(s, r, HDR_IDEMPOTENCY_KEY);
    r->pub.method = p->method;
    r->pub.start_ns = uv_hrtime();
    r->head_method = p->method == HTTP_HEAD;
    r->close_after = !llhttp_should_keep_alive(p) || p->upgrade || s->env->draining;

    bool has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > (uint64_t)lim->max_body_bytes) {
        s->error_status = 413;
        return -1;
    }
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0) {
        r->body_cap = (size_t)p->content_length + 1;
        r->body_buf = http_request_alloc(&r->pub, r->body_cap);
    }
    if (has_body && s->hdr[HDR_EXPECT].set && p->http_major == 1 && p->http_minor >= 1 &&
        s->hdr[HDR_EXPECT].len == 12 &&
        strncasecmp(s->scratch + s->hdr[HDR_EXPECT].off, "100-continue", 12) == 0)
        r->want_continue = true;
    s->head_done = true;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct http_session *s = SESSION(p);
    struct http_req *r = s->cur;
    size_t have = r->pub.body_len;
    if (have + len > (size_t)s->env->limits.max_body_bytes) return fail_in_cb(s, 413);
    if (have + len + 1 > r->body_cap) {
        /* Chunked: grow by doubling inside the arena (bounded by max_body_bytes). */
        size_t cap = r->body_cap ? r->body_cap * 2 : 1024;
        while (cap < have + len + 1) cap *= 2;
        char *nb = http_request_alloc(&r->pub, cap);
        if (have) memcpy(nb, r->body_buf, have);
        r->body_buf = nb;
        r->body_cap = cap;
    }
    memcpy(r->body_buf + have, at, len);
    r->pub.body_len = have + len;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct http_session *s = SESSION(p);
    struct http_req *r = s->cur;
    struct http_env *env = s->env;
    if (r->body_buf) {
        r->body_buf[r->pub.body_len] = '\0';
        r->pub.body = r->body_buf;
    }
    s->cur = NULL;
    s->head_done = false;
    r->state = REQ_HANDLER;
    s->unanswered++;
    s->refs++;
    env->pending++;
    bool close_after = r->close_after;
    env->handler(&r->pub, env->handler_ud);
    /* r is still queued (only http_session_written frees it), but do not rely on it. */
    if (close_after) {
        s->input_closed = true;
        return HPE_PAUSED;
    }
    if (s->input_closed) return HPE_PAUSED;
    if (s->queued >= (unsigned)env->limits.max_pipelined) {
        s->paused = true;
        return HPE_PAUSED;
    }
    return 0;
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_method = on_method,
    .on_version = on_method,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- session ---- */

void http_session_init(struct http_session *s, struct http_env *env, void *owner)
{
    memset(s, 0, sizeof *s);
    s->env = env;
    s->owner = owner;
    s->capture = -1;
    llhttp_init(&s->parser, HTTP_REQUEST, &parser_settings);
    s->parser.data = s;
}

static void hold_back(struct http_session *s, const char *from, size_t n)
{
    /* from may point into pending_in itself (when resuming): memmove, no realloc needed
     * since n never exceeds what it already holds. */
    if (n > s->pending_cap) {
        char *p = realloc(s->pending_in, n);
        if (!p) {
            log_error("http", "event=oom bytes=%zu", n);
            abort();
        }
        s->pending_in = p;
        s->pending_cap = n;
    }
    memmove(s->pending_in, from, n);
    s->pending_len = n;
}

static void parse(struct http_session *s, const char *data, size_t len)
{
    llhttp_errno_t err = llhttp_execute(&s->parser, data, len);
    switch (err) {
    case HPE_OK:
        return;
    case HPE_PAUSED:
        if (s->input_closed) return; /* the rest of the input is discarded */
        if (s->paused) {
            const char *pos = llhttp_get_error_pos(&s->parser);
            if (pos && pos >= data && pos < data + len) hold_back(s, pos, (size_t)(data + len - pos));
        }
        return;
    case HPE_PAUSED_UPGRADE:
    case HPE_PAUSED_H2_UPGRADE:
        s->input_closed = true; /* no upgrades: answer what we have, then close */
        return;
    default:
        if (s->input_closed && !s->cur) return;
        log_debug("http", "event=parse_error err=%s reason=\"%s\"", llhttp_errno_name(err),
                  s->parser.reason ? s->parser.reason : "");
        http_session_fail(s, s->error_status ? s->error_status : 400);
        return;
    }
}

void http_session_feed(struct http_session *s, const char *data, size_t len)
{
    if (s->input_closed || s->detached || len == 0) return;
    if (s->paused) {
        /* The owner reads on after a pause only by mistake; keep the bytes anyway. */
        size_t n = s->pending_len + len;
        if (n > s->pending_cap) {
            char *p = realloc(s->pending_in, n);
            if (!p) abort();
            s->pending_in = p;
            s->pending_cap = n;
        }
        memcpy(s->pending_in + s->pending_len, data, len);
        s->pending_len = n;
        return;
    }
    parse(s, data, len);
}

void http_session_resume(struct http_session *s)
{
    if (!s->paused || s->detached) return;
    if (s->input_closed) {
        s->paused = false;
        s->pending_len = 0;
        return;
    }
    if (s->queued >= (unsigned)s->env->limits.max_pipelined) return;
    s->paused = false;
    llhttp_resume(&s->parser);
    size_t n = s->pending_len;
    s->pending_len = 0;
    if (n) parse(s, s->pending_in, n);
    if (s->eof_after_pending && !s->paused) http_session_input_close(s);
}

void http_session_eof(struct http_session *s)
{
    if (s->paused && s->pending_len > 0 && !s->input_closed) s->eof_after_pending = true;
    else http_session_input_close(s);
}

void http_session_input_close(struct http_session *s)
{
    if (s->cur) {
        s->cur = NULL;
        s->head_done = false;
        queue_drop_tail(s);
    }
    s->input_closed = true;
    s->pending_len = 0;
}

unsigned http_session_collect(struct http_session *s, uv_buf_t *bufs, unsigned max,
                              unsigned *nreqs)
{
    unsigned n = 0, k = 0;
    struct http_req *r = s->unsent;
    while (r && n < max) {
        if (r->state == REQ_READY) {
            bufs[n++] = uv_buf_init((char *)r->out, (unsigned)r->out_len);
            k++;
            r = r->next;
            s->unsent = r;
            continue;
        }
        /* First unanswered request: it may still deserve its interim 100 Continue. */
        if (r == s->cur && s->head_done && r->want_continue && !r->continue_sent) {
            bufs[n++] = uv_buf_init((char *)continue_line, sizeof continue_line - 1);
            r->continue_sent = true;
        }
        break;
    }
    *nreqs = k;
    return n;
}

void http_session_written(struct http_session *s, unsigned n)
{
    while (n-- > 0 && s->head) {
        struct http_req *r = s->head;
        s->head = r->next;
        if (!s->head) s->tail = NULL;
        s->queued--;
        req_free(s->env, r);
    }
}

enum http_phase http_session_phase(const struct http_session *s)
{
    if (s->cur) return s->head_done ? HTTP_PHASE_BODY : HTTP_PHASE_HEAD;
    return s->head ? HTTP_PHASE_BUSY : HTTP_PHASE_IDLE;
}

bool http_session_detach(struct http_session *s)
{
    s->detached = true;
    s->input_closed = true;
    struct http_req *r = s->head;
    while (r) {
        struct http_req *next = r->next;
        if (r->state == REQ_HANDLER) r->state = REQ_ORPHAN;
        else req_free(s->env, r);
        r = next;
    }
    s->head = s->tail = s->unsent = s->cur = NULL;
    s->queued = 0;
    s->unanswered = 0;
    return s->refs == 0;
}

void http_session_destroy(struct http_session *s)
{
    free(s->scratch);
    free(s->pending_in);
    s->scratch = s->pending_in = NULL;
}

void http_env_cleanup(struct http_env *env)
{
    while (env->free_reqs) {
        struct http_req *r = env->free_reqs;
        env->free_reqs = r->next;
        free(r);
    }
    env->nfree = 0;
}
