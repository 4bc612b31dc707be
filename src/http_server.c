/* http_server: the libuv transport around http_parse's sessions.
 *
 * Each connection owns a uv_tcp_t, a uv_timer_t and a session. Everything that can
 * produce output (a read, an answer from the handler, a write completing, a timer) only
 * marks the connection dirty; the server then services dirty connections once per loop
 * phase (uv_check after I/O, uv_idle before the next poll, the idle handle also keeping the
 * poll from blocking), so responses that become ready in the same tick leave in one
 * writev, tried synchronously first (uv_try_write) and queued with uv_write for the rest.
 *
 * Decisions worth knowing:
 * - Over max_connections the server stops accepting (nginx's way): the listen socket is no
 *   longer polled (libuv stops watching it while an accepted descriptor waits for
 *   uv_accept), so new connections wait in the kernel's accept queue (the listen backlog,
 *   capped by net.core.somaxconn) and, beyond it, their SYNs are retried by the client's
 *   kernel; each close below the limit accepts the next one. Nothing is spent on the waiting
 *   clients, and a load balancer in front sees a slow connect, not an error. With
 *   overflow_reject the connection is accepted, answered 503 (Retry-After: 1, Connection:
 *   close) and closed instead; past 64 such connections at once, new ones are closed without
 *   an answer. docs/SIZING.md has the measurements of both.
 * - Expect: 100-continue is answered with "100 Continue" when the request is next in line
 *   and its announced body is within the limit (413 otherwise).
 * - Timers, one per connection: header timeout from the first byte of a head until the
 *   head is complete (then 408 and close); the request deadline from that first byte until
 *   the body is complete (408 and close: a body trickled a byte at a time would otherwise
 *   restart the progress timer forever); idle timeout while keep-alive idle (silent close)
 *   and as a progress timeout while a body arrives or a write is stuck; none while the
 *   handler holds a request.
 * - A connection that closes after an error answer (400, 408, 413, 431, 503) is shut down
 *   for writing and drained for up to HTTP_LINGER_MS before it is closed, so the client
 *   reads the answer instead of a reset; other closes are immediate once all is written.
 * - EOF from the client: complete requests already received are still answered, then the
 *   connection closes. */
#include "http_server.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "http_parse.h"
#include "limits.h"
#include "log.h"


enum timer_mode { TM_NONE, TM_HEAD, TM_IDLE, TM_PROGRESS, TM_LINGER };

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    struct http_session sess;
    struct http_server *srv;
    struct conn *prev, *next;       /* srv->conns: connections whose handles are open */
    struct conn *dirty_next;
    unsigned handles_open;
    unsigned writes;                /* uv_write requests in flight */
    uint64_t timer_msg;             /* session message count the head timer was armed for */
    uint64_t deadline_ms;           /* uv_now() by which the current request must be in */
    enum timer_mode tmode;
    bool dirty, reading, closing, lingering, eof, progress, rejected, in_list;
};

struct write_ctx {
    uv_write_t req;
    struct conn *c;
    unsigned nreqs;
    struct write_ctx *next_free;
};

struct http_server {
    uv_tcp_t listener;
    uv_check_t check;
    uv_idle_t idle;
    uv_loop_t *loop;
    struct http_env env;
    struct conn *conns;
    unsigned nconns;                /* open, counted against max_connections */
    unsigned nrejecting;            /* open, being answered 503 */
    unsigned live;                  /* allocated (includes closed ones held by orphans) */
    struct conn *dirty;
    struct write_ctx *free_writes;
    unsigned nfree_writes;
    unsigned handles_open;
    int port;
    bool accepting, closing, finishing;
    bool accept_paused;             /* a connection waits in libuv for uv_accept (at the limit) */
    void (*done)(void *);
    void *done_ud;
    char readbuf[HTTP_READ_BUF_BYTES];
};

static void conn_service(struct conn *c);
static void conn_close(struct conn *c);
static void on_idle(uv_idle_t *h);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_timer(uv_timer_t *t);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void accept_one(struct http_server *srv);

/* ---- dirty list ---- */

static void mark_dirty(struct conn *c)
{
    if (c->dirty || c->closing) return;
    struct http_server *srv = c->srv;
    c->dirty = true;
    c->dirty_next = srv->dirty;
    srv->dirty = c;
    if (!uv_is_active((uv_handle_t *)&srv->idle)) uv_idle_start(&srv->idle, on_idle);
}

static void flush_dirty(struct http_server *srv)
{
    /* Servicing may mark connections dirty again (a resumed session answering at once):
     * loop until quiet. */
    while (srv->dirty) {
        struct conn *c = srv->dirty;
        srv->dirty = c->dirty_next;
        c->dirty = false;
        c->dirty_next = NULL;
        conn_service(c);
    }
    if (uv_is_active((uv_handle_t *)&srv->idle)) uv_idle_stop(&srv->idle);
}

static void on_check(uv_check_t *h) { flush_dirty(h->data); }
static void on_idle(uv_idle_t *h) { flush_dirty(h->data); }

static void on_output_ready(struct http_session *s) { mark_dirty(s->owner); }

/* ---- server teardown ---- */

static void on_server_handle_closed(uv_handle_t *h)
{
    struct http_server *srv = h->data;
    if (--srv->handles_open > 0) return;
    void (*done)(void *) = srv->done;
    void *ud = srv->done_ud;
    http_env_cleanup(&srv->env);
    while (srv->free_writes) {
        struct write_ctx *w = srv->free_writes;
        srv->free_writes = w->next_free;
        free(w);
    }
    free(srv);
    if (done) done(ud);
}

static void server_maybe_finish(struct http_server *srv)
{
    if (!srv->closing || srv->finishing || srv->live > 0 || srv->accepting) return;
    srv->finishing = true;
    uv_close((uv_handle_t *)&srv->check, on_server_handle_closed);
    uv_close((uv_handle_t *)&srv->idle, on_server_handle_closed);
}

/* ---- connection teardown ---- */

static void conn_free(struct conn *c)
{
    struct http_server *srv = c->srv;
    http_session_destroy(&c->sess);
    free(c);
    srv->live--;
    server_maybe_finish(srv);
}

static void on_released(struct http_session *s) { conn_free(s->owner); }

static void on_conn_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    if (--c->handles_open > 0) return;
    struct http_server *srv = c->srv;
    if (c->in_list) {
        if (c->prev) c->prev->next = c->next;
        else srv->conns = c->next;
        if (c->next) c->next->prev = c->prev;
        c->in_list = false;
        if (c->rejected) srv->nrejecting--;
        else srv->nconns--;
    }
    if (srv->accept_paused && srv->accepting &&
        srv->nconns < (unsigned)srv->env.limits.max_connections) {
        srv->accept_paused = false;
        accept_one(srv); /* uv_accept also resumes polling the listen socket */
    }
    if (c->dirty) { /* rare: unlink from the dirty list */
        struct conn **pp = &srv->dirty;
        while (*pp && *pp != c) pp = &(*pp)->dirty_next;
        if (*pp) *pp = c->dirty_next;
        c->dirty = false;
    }
    /* Write callbacks (ECANCELED) have all run by now: no buffer of the session is in use. */
    if (http_session_detach(&c->sess)) conn_free(c);
}

static void conn_close(struct conn *c)
{
    if (c->closing) return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) { (void)req; (void)status; }

/* Everything is written and nothing more will be parsed. After an error answer the client
 * may still be sending (a body we refused): FIN, then drain until it closes or the linger
 * time is up, so it reads our answer rather than a reset. Otherwise close at once. */
static void conn_finish(struct conn *c)
{
    if (c->eof || c->lingering || !c->sess.failed) {
        conn_close(c);
        return;
    }
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        conn_close(c);
        return;
    }
    c->lingering = true;
    c->tmode = TM_LINGER;
    uv_timer_start(&c->timer, on_timer, HTTP_LINGER_MS, 0);
    if (!c->reading && uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
}

/* ---- I/O ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    struct conn *c = h->data;
    /* One buffer for all connections: a read is fully consumed (copied where it must
     * live on) before the next one. */
    *buf = uv_buf_init(c->srv->readbuf, sizeof c->srv->readbuf);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = stream->data;
    if (c->closing) return;
    if (nread > 0) {
        if (c->lingering) return; /* draining before close */
        c->progress = true;
        http_session_feed(&c->sess, buf->base, (size_t)nread);
        if (http_session_paused(&c->sess)) {
            uv_read_stop(stream);
            c->reading = false;
        }
        mark_dirty(c);
        return;
    }
    if (nread == 0) return;
    if (nread == UV_EOF) {
        c->eof = true;
        uv_read_stop(stream);
        c->reading = false;
        if (c->lingering) {
            conn_close(c);
            return;
        }
        http_session_eof(&c->sess);
        mark_dirty(c);
        return;
    }
    log_debug("http", "event=read_error err=%s", uv_err_name((int)nread));
    conn_close(c);
}

static struct write_ctx *write_ctx_get(struct http_server *srv)
{
    struct write_ctx *w = srv->free_writes;
    if (w) {
        srv->free_writes = w->next_free;
        srv->nfree_writes--;
        return w;
    }
    w = malloc(sizeof *w);
    if (!w) {
        log_error("http", "event=oom bytes=%zu", sizeof *w);
        abort();
    }
    return w;
}

static void write_ctx_put(struct http_server *srv, struct write_ctx *w)
{
    if (srv->nfree_writes < HTTP_WRITE_CACHE_MAX) {
        w->next_free = srv->free_writes;
        srv->free_writes = w;
        srv->nfree_writes++;
    } else {
        free(w);
    }
}

static void on_write(uv_write_t *req, int status)
{
    struct write_ctx *w = (struct write_ctx *)req;
    struct conn *c = w->c;
    c->writes--;
    http_session_written(&c->sess, w->nreqs);
    write_ctx_put(c->srv, w);
    if (c->closing) return;
    if (status < 0) {
        log_debug("http", "event=write_error err=%s", uv_err_name(status));
        conn_close(c);
        return;
    }
    c->progress = true;
    mark_dirty(c);
}

/* Writes bufs in order: synchronously when the socket takes it all, else queued. */
static int conn_write(struct conn *c, uv_buf_t *bufs, unsigned n, unsigned nreqs)
{
    size_t total = 0;
    for (unsigned i = 0; i < n; i++) total += bufs[i].len;
    int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, n);
    if (r >= 0 && (size_t)r == total) {
        http_session_written(&c->sess, nreqs);
        return 0;
    }
    if (r < 0 && r != UV_EAGAIN) return r;
    size_t skip = r > 0 ? (size_t)r : 0;
    unsigned i = 0;
    while (skip >= bufs[i].len) skip -= bufs[i++].len;
    bufs[i].base += skip;
    bufs[i].len -= skip;
    struct write_ctx *w = write_ctx_get(c->srv);
    w->c = c;
    w->nreqs = nreqs;
    r = uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs + i, n - i, on_write);
    if (r < 0) {
        write_ctx_put(c->srv, w);
        return r;
    }
    c->writes++;
    return 0;
}

static void conn_timeout_408(struct conn *c, const char *event)
{
    log_debug("http", "event=%s", event);
    c->tmode = TM_NONE;
    http_session_fail(&c->sess, 408);
    mark_dirty(c);
}

static void on_timer(uv_timer_t *t)
{
    struct conn *c = t->data;
    if (c->closing) return;
    switch (c->tmode) {
    case TM_HEAD:
        conn_timeout_408(c, "header_timeout");
        break;
    case TM_PROGRESS:
        if (c->srv->env.limits.request_timeout_ms && uv_now(c->srv->loop) >= c->deadline_ms &&
            http_session_phase(&c->sess) == HTTP_PHASE_BODY) {
            conn_timeout_408(c, "request_timeout");
            break;
        }
        /* fall through */
    case TM_IDLE:
        log_debug("http", "event=idle_timeout");
        conn_close(c);
        break;
    case TM_LINGER:
        conn_close(c);
        break;
    case TM_NONE:
        break;
    }
}

static void conn_update_timer(struct conn *c)
{
    const struct http_limits *lim = &c->srv->env.limits;
    enum http_phase ph = http_session_phase(&c->sess);
    bool new_msg = (ph == HTTP_PHASE_HEAD || ph == HTTP_PHASE_BODY) &&
                   c->timer_msg != c->sess.messages;
    if (new_msg) { /* the head may have arrived whole in one read: start the clock here too */
        c->timer_msg = c->sess.messages;
        c->deadline_ms = uv_now(c->srv->loop) + lim->request_timeout_ms;
    }
    if (ph == HTTP_PHASE_HEAD) {
        if (c->tmode != TM_HEAD || new_msg) {
            c->tmode = TM_HEAD;
            uint64_t ms = lim->header_timeout_ms;
            if (lim->request_timeout_ms && lim->request_timeout_ms < ms) ms = lim->request_timeout_ms;
            uv_timer_start(&c->timer, on_timer, ms, 0);
        }
    } else if (ph == HTTP_PHASE_IDLE) {
        if (c->tmode != TM_IDLE) {
            c->tmode = TM_IDLE;
            uv_timer_start(&c->timer, on_timer, lim->idle_timeout_ms, 0);
        }
    } else if (ph == HTTP_PHASE_BODY || c->writes > 0) {
        if (c->tmode != TM_PROGRESS || c->progress || new_msg) {
            c->tmode = TM_PROGRESS;
            uint64_t ms = lim->idle_timeout_ms, now = uv_now(c->srv->loop);
            if (ph == HTTP_PHASE_BODY && lim->request_timeout_ms) {
                uint64_t left = c->deadline_ms > now ? c->deadline_ms - now : 0;
                if (left < ms) ms = left;
            }
            uv_timer_start(&c->timer, on_timer, ms, 0);
        }
    } else if (c->tmode != TM_NONE) {
        /* Waiting for the handler (or a paused pipeline): its own timeouts apply. */
        c->tmode = TM_NONE;
        uv_timer_stop(&c->timer);
    }
    c->progress = false;
}

static void conn_service(struct conn *c)
{
    struct http_session *s = &c->sess;
    if (c->closing || c->lingering) return;
    if (c->srv->closing && !s->input_closed) http_session_input_close(s);
    for (int round = 0;; round++) {
        http_session_resume(s);
        for (;;) {
            uv_buf_t bufs[HTTP_WRITE_BATCH];
            unsigned nreqs;
            unsigned n = http_session_collect(s, bufs, HTTP_WRITE_BATCH, &nreqs);
            if (n == 0) break;
            int r = conn_write(c, bufs, n, nreqs);
            if (r < 0) {
                log_debug("http", "event=write_error err=%s", uv_err_name(r));
                conn_close(c);
                return;
            }
            if (n < HTTP_WRITE_BATCH) break;
        }
        /* Writes that completed at once may have made room for held-back pipelined input. */
        if (!http_session_paused(s) || s->queued >= (unsigned)s->env->limits.max_pipelined ||
            round > 1000)
            break;
    }
    if (http_session_finished(s) && c->writes == 0) {
        conn_finish(c);
        return;
    }
    bool want_read = !http_session_paused(s) && !c->eof;
    if (want_read && !c->reading) {
        int r = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        if (r < 0) {
            conn_close(c);
            return;
        }
        c->reading = true;
    } else if (!want_read && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
    conn_update_timer(c);
}

/* ---- accepting ---- */

static void on_connection(uv_stream_t *listener, int status)
{
    struct http_server *srv = listener->data;
    if (status < 0) {
        log_debug("http", "event=accept_error err=%s", uv_err_name(status));
        return;
    }
    if (!srv->env.limits.overflow_reject &&
        srv->nconns >= (unsigned)srv->env.limits.max_connections) {
        /* Not calling uv_accept makes libuv stop polling the listener until we do. */
        if (!srv->accept_paused) log_debug("http", "event=accept_paused open=%u", srv->nconns);
        srv->accept_paused = true;
        return;
    }
    accept_one(srv);
}

static void accept_one(struct http_server *srv)
{
    uv_stream_t *listener = (uv_stream_t *)&srv->listener;
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        log_error("http", "event=oom bytes=%zu", sizeof *c);
        abort();
    }
    c->srv = srv;
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles_open = 2;
    srv->live++;
    http_session_init(&c->sess, &srv->env, c);
    int r = uv_accept(listener, (uv_stream_t *)&c->tcp);
    if (r < 0) {
        log_debug("http", "event=accept_error err=%s", uv_err_name(r));
        conn_close(c);
        return;
    }
    bool over = srv->nconns >= (unsigned)srv->env.limits.max_connections;
    if (over && srv->nrejecting >= HTTP_MAX_REJECTING) {
        log_debug("http", "event=connection_dropped open=%u", srv->nconns);
        conn_close(c);
        return;
    }
    c->in_list = true;
    c->next = srv->conns;
    if (srv->conns) srv->conns->prev = c;
    srv->conns = c;
    if (over) {
        c->rejected = true;
        srv->nrejecting++;
        log_debug("http", "event=connection_rejected open=%u", srv->nconns);
        http_session_fail(&c->sess, 503);
    } else {
        srv->nconns++;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    mark_dirty(c);
}

static int parse_listen(const char *listen, struct sockaddr_storage *ss)
{
    const char *colon = strrchr(listen, ':');
    if (!colon) return UV_EINVAL;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || end == colon + 1 || port < 0 || port > 65535) return UV_EINVAL;
    char host[64];
    size_t hl = (size_t)(colon - listen);
    if (hl >= sizeof host) return UV_EINVAL;
    memcpy(host, listen, hl);
    host[hl] = '\0';
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        return uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)ss);
    }
    return uv_ip4_addr(hl ? host : "0.0.0.0", (int)port, (struct sockaddr_in *)ss);
}

static void on_start_failed_closed(uv_handle_t *h)
{
    struct http_server *srv = h->data;
    if (--srv->handles_open == 0) free(srv);
}

void http_raise_fd_limit(int max_connections)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    rlim_t before = rl.rlim_cur;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) rl.rlim_cur = before;
    }
    log_info("http", "event=fd_limit soft=%llu hard=%llu was=%llu",
             (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max,
             (unsigned long long)before);
    /* Descriptors beyond the connections: PostgreSQL, Kafka, the sink, logs: a few dozen. */
    if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)max_connections + 64 > rl.rlim_cur)
        log_warn("http", "event=fd_limit_low max_connections=%d soft=%llu "
                 "hint=\"accept fails with EMFILE before MAX_CONNECTIONS; raise ulimit -n\"",
                 max_connections, (unsigned long long)rl.rlim_cur);
}

int http_server_start(struct http_server **out, uv_loop_t *loop, const char *listen,
                      const struct http_limits *limits, http_handler_fn handler, void *ud)
{
    struct sockaddr_storage ss;
    *out = NULL;
    int r = parse_listen(listen, &ss);
    if (r < 0) return r;
    struct http_server *srv = calloc(1, sizeof *srv);
    if (!srv) return UV_ENOMEM;
    srv->loop = loop;
    srv->env.limits = *limits;
    if (srv->env.limits.max_pipelined < 1) srv->env.limits.max_pipelined = 1;
    if (srv->env.limits.max_connections < 1) srv->env.limits.max_connections = 1;
    srv->env.handler = handler;
    srv->env.handler_ud = ud;
    srv->env.output_ready = on_output_ready;
    srv->env.released = on_released;
    http_raise_fd_limit(srv->env.limits.max_connections);

    uv_tcp_init(loop, &srv->listener);
    srv->listener.data = srv;
    srv->handles_open = 1;
    r = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&ss, 0);
    if (r == 0) r = uv_listen((uv_stream_t *)&srv->listener, HTTP_BACKLOG, on_connection);
    if (r < 0) {
        /* The handle is freed on the next loop turn (only uv_close may release it). */
        uv_close((uv_handle_t *)&srv->listener, on_start_failed_closed);
        return r;
    }
    struct sockaddr_storage name;
    int namelen = sizeof name;
    if (uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&name, &namelen) == 0)
        srv->port = ntohs(name.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&name)->sin6_port
                                                      : ((struct sockaddr_in *)&name)->sin_port);
    uv_check_init(loop, &srv->check);
    uv_idle_init(loop, &srv->idle);
    srv->check.data = srv->idle.data = srv;
    srv->handles_open += 2;
    uv_check_start(&srv->check, on_check);
    /* The idle handle only keeps poll from blocking while connections are dirty. */
    uv_unref((uv_handle_t *)&srv->check);
    uv_unref((uv_handle_t *)&srv->idle);
    srv->accepting = true;
    *out = srv;
    log_info("http", "event=listen addr=%s port=%d", listen, srv->port);
    return 0;
}

int http_server_port(const struct http_server *s) { return s->port; }

void http_server_stop_accepting(struct http_server *s)
{
    s->env.draining = true;
    if (!s->accepting) return;
    s->accepting = false;
    uv_close((uv_handle_t *)&s->listener, on_server_handle_closed);
    server_maybe_finish(s);
}

unsigned http_server_pending(const struct http_server *s) { return s->env.pending; }

void http_server_close(struct http_server *s, void (*done)(void *ud), void *ud)
{
    s->done = done;
    s->done_ud = ud;
    s->closing = true;
    http_server_stop_accepting(s);
    for (struct conn *c = s->conns; c; c = c->next) mark_dirty(c);
    server_maybe_finish(s);
}
