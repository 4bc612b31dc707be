/* Unit test of http_server: the server runs on a libuv loop in its own thread, the checks
 * talk to it over real blocking sockets from the main thread. One line per check, then
 * "N passed, N failed" (check.h); exit status 1 on any failure. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "check.h"
#include "http_server.h"

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ loop thread side */

static uv_loop_t loop;
static uv_async_t wakeup;
static struct http_server *srv_main, *srv_small;
static int port_main, port_small;
static _Atomic int done_main, done_small; /* set by http_server_close's done callback */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static void (*loop_job)(void);
static int loop_job_done;

/* Requests parked by "/hold", answered by release_held(). */
#define MAX_HELD 16
static struct http_request *held[MAX_HELD];
static int nheld;

struct late {
    uv_timer_t timer;
    struct http_request *req;
};

static void late_closed(uv_handle_t *h) { free(h->data); }

static void late_fire(uv_timer_t *t)
{
    struct late *l = t->data;
    char body[256];
    int n = snprintf(body, sizeof body, "late path=%s query=%s", l->req->path, l->req->query);
    http_respond(l->req, 200, "text/plain", body, (size_t)n, NULL);
    uv_close((uv_handle_t *)&l->timer, late_closed);
}

static void handler(struct http_request *req, void *ud)
{
    struct http_server **srvp = ud;
    if (strcmp(req->path, "/late") == 0) {
        struct late *l = malloc(sizeof *l);
        l->req = req;
        uv_timer_init(&loop, &l->timer);
        l->timer.data = l;
        int ms = atoi(req->query[0] == 'm' ? req->query + 3 : "100"); /* "ms=N" */
        uv_timer_start(&l->timer, late_fire, (uint64_t)ms, 0);
        return;
    }
    if (strcmp(req->path, "/hold") == 0 && nheld < MAX_HELD) {
        held[nheld++] = req;
        return;
    }
    if (strcmp(req->path, "/pending") == 0) {
        char body[64];
        /* minus this request itself */
        int n = snprintf(body, sizeof body, "pending=%u", http_server_pending(*srvp) - 1);
        http_respond(req, 200, "text/plain", body, (size_t)n, NULL);
        return;
    }
    /* Echo: method, path, query, captured headers and the body; arena-allocated. */
    size_t cap = 512 + req->body_len;
    char *out = http_request_alloc(req, cap);
    int n = snprintf(out, cap, "method=%d path=%s query=%s ct=%s auth=%s idem=%s len=%zu body=%s",
                     req->method, req->path, req->query,
                     req->content_type ? req->content_type : "-",
                     req->authorization ? req->authorization : "-",
                     req->idempotency_key ? req->idempotency_key : "-", req->body_len, req->body);
    http_respond(req, 200, "text/plain", out, (size_t)n, "X-Test: 1\r\n");
}

static void on_done(void *ud) { *(_Atomic int *)ud = 1; }

static void on_wakeup(uv_async_t *a)
{
    (void)a;
    pthread_mutex_lock(&mu);
    void (*job)(void) = loop_job;
    loop_job = NULL;
    pthread_mutex_unlock(&mu);
    if (job) job();
    pthread_mutex_lock(&mu);
    loop_job_done = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* Runs job on the loop thread and waits for it. */
static void run_on_loop(void (*job)(void))
{
    pthread_mutex_lock(&mu);
    loop_job = job;
    loop_job_done = 0;
    pthread_mutex_unlock(&mu);
    uv_async_send(&wakeup);
    pthread_mutex_lock(&mu);
    while (!loop_job_done) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static void release_held(void)
{
    for (int i = 0; i < nheld; i++) http_respond(held[i], 200, "text/plain", "released", 8, NULL);
    nheld = 0;
}

static void close_main(void) { http_server_close(srv_main, on_done, &done_main); }
static void close_small(void) { http_server_close(srv_small, on_done, &done_small); }
static void close_async(void) { uv_close((uv_handle_t *)&wakeup, NULL); }

static void *loop_thread(void *arg)
{
    (void)arg;
    uv_run(&loop, UV_RUN_DEFAULT);
    return NULL;
}

/* ------------------------------------------------------------------ client side */

struct client {
    int fd;
    char buf[65536];
    size_t len;
};

struct resp {
    int status;
    char head[4096];
    char body[8192];
    size_t body_len;
};

static int client_open(struct client *c, int port)
{
    c->len = 0;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {3, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    return 0;
}

static void client_close(struct client *c)
{
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

static int send_str(struct client *c, const char *s)
{
    size_t n = strlen(s), off = 0;
    while (off < n) {
        ssize_t w = send(c->fd, s + off, n - off, MSG_NOSIGNAL);
        if (w <= 0) return -1;
        off += (size_t)w;
    }
    return 0;
}

/* Reads more into the buffer; 0 on EOF, -1 on error/timeout. */
static int fill(struct client *c)
{
    if (c->len == sizeof c->buf) return -1;
    ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (r > 0) c->len += (size_t)r;
    return r > 0 ? 1 : r == 0 ? 0 : -1;
}

static void consume(struct client *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

/* Reads one response (Content-Length framed; none means no body). Returns its status, or
 * -1 when the connection ended or timed out first. HEAD responses: pass no_body. */
static int read_resp_opt(struct client *c, struct resp *r, int no_body)
{
    memset(r, 0, sizeof *r);
    char *end;
    for (;;) {
        c->buf[c->len < sizeof c->buf ? c->len : sizeof c->buf - 1] = '\0';
        end = c->len ? memmem(c->buf, c->len, "\r\n\r\n", 4) : NULL;
        if (end) break;
        if (fill(c) <= 0) return -1;
    }
    size_t head_len = (size_t)(end - c->buf) + 4;
    if (head_len >= sizeof r->head) return -1;
    memcpy(r->head, c->buf, head_len);
    r->head[head_len] = '\0';
    if (sscanf(r->head, "HTTP/1.1 %d", &r->status) != 1) return -1;
    size_t cl = 0;
    const char *p = strcasestr(r->head, "\r\nContent-Length:");
    if (p && !no_body) cl = (size_t)strtoul(p + 17, NULL, 10);
    while (c->len < head_len + cl)
        if (fill(c) <= 0) return -1;
    if (cl >= sizeof r->body) return -1;
    memcpy(r->body, c->buf + head_len, cl);
    r->body[cl] = '\0';
    r->body_len = cl;
    consume(c, head_len + cl);
    return r->status;
}

static int read_resp(struct client *c, struct resp *r) { return read_resp_opt(c, r, 0); }

/* True when the server closes the connection within ms (EOF or reset, no more data). */
static int closed_within(struct client *c, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char tmp[4096];
    for (;;) {
        ssize_t r = recv(c->fd, tmp, sizeof tmp, 0);
        if (r == 0) return 1;
        if (r < 0) return errno == ECONNRESET;
    }
}

static int contains(const char *hay, const char *needle) { return strstr(hay, needle) != NULL; }

/* ------------------------------------------------------------------ checks */

static void test_simple(void)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    send_str(&c, "GET /echo?x=1&y=2 HTTP/1.1\r\nHost: t\r\n\r\n");
    int st = read_resp(&c, &r);
    CHECK(st == 200, "simple GET answered 200 (got %d)", st);
    CHECK(contains(r.body, "method=1 path=/echo query=x=1&y=2"), "GET path and query split at '?': %s", r.body);
    CHECK(contains(r.head, "Content-Type: text/plain\r\n") && contains(r.head, "X-Test: 1\r\n") &&
              !contains(r.head, "Connection: close"),
          "response head has content type, extra headers, no Connection: close");

    send_str(&c, "POST /echo HTTP/1.1\r\nHost: t\r\ncontent-TYPE: application/json \r\n"
                 "AUTHORIZATION: Bearer s3cret\r\nIdempotency-Key: k-1\r\nIdempotency-Key: k-2\r\n"
                 "Content-Length: 13\r\n\r\n{\"a\":\"hello\"}");
    st = read_resp(&c, &r);
    CHECK(st == 200, "keep-alive: second request (POST) on the same connection answered (got %d)", st);
    CHECK(contains(r.body, "method=3 path=/echo query= ct=application/json auth=Bearer s3cret idem=k-1 "
                           "len=13 body={\"a\":\"hello\"}"),
          "POST headers captured case-insensitively, first Idempotency-Key kept, body intact: %s", r.body);

    send_str(&c, "HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n");
    st = read_resp_opt(&c, &r, 1);
    CHECK(st == 200 && contains(r.head, "Content-Length: ") && r.body_len == 0,
          "HEAD answered with Content-Length and no body");
    send_str(&c, "GET /echo?after=head HTTP/1.1\r\nHost: t\r\n\r\n");
    st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "query=after=head"), "request after HEAD is framed correctly");
    client_close(&c);
}

static void test_http10_and_close(void)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    send_str(&c, "GET /echo HTTP/1.0\r\n\r\n");
    int st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.head, "Connection: close"), "HTTP/1.0 answered with Connection: close");
    CHECK(closed_within(&c, 3000), "HTTP/1.0 connection closed after the response");
    client_close(&c);

    client_open(&c, port_main);
    send_str(&c, "GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /echo?two HTTP/1.0\r\n\r\n");
    st = read_resp(&c, &r);
    int st2 = read_resp(&c, &r);
    CHECK(st == 200 && st2 == 200 && contains(r.body, "query=two"), "HTTP/1.0 keep-alive honoured");
    client_close(&c);

    client_open(&c, port_main);
    send_str(&c, "GET /echo HTTP/1.1\r\nConnection: close\r\n\r\nGET /echo?ignored HTTP/1.1\r\n\r\n");
    st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.head, "Connection: close"), "Connection: close echoed");
    CHECK(closed_within(&c, 3000), "input after a Connection: close request ignored, connection closed");
    client_close(&c);
}

static void test_pipelining(void)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    send_str(&c, "GET /late?ms=150 HTTP/1.1\r\nHost: t\r\n\r\n"
                 "GET /echo?n=2 HTTP/1.1\r\nHost: t\r\n\r\n"
                 "POST /echo?n=3 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    int s1 = read_resp(&c, &r);
    int ok1 = s1 == 200 && contains(r.body, "late path=/late");
    int s2 = read_resp(&c, &r);
    int ok2 = s2 == 200 && contains(r.body, "query=n=2");
    int s3 = read_resp(&c, &r);
    int ok3 = s3 == 200 && contains(r.body, "query=n=3") && contains(r.body, "body=abc");
    CHECK(ok1 && ok2 && ok3, "3 pipelined requests, first answered late: responses in order");

    /* More than max_pipelined (4) in one write, the first late: parsing pauses and resumes. */
    char big[8192];
    size_t off = (size_t)snprintf(big, sizeof big, "GET /late?ms=100 HTTP/1.1\r\nHost: t\r\n\r\n");
    for (int i = 1; i < 12; i++)
        off += (size_t)snprintf(big + off, sizeof big - off, "GET /echo?i=%d HTTP/1.1\r\nHost: t\r\n\r\n", i);
    send_str(&c, big);
    int in_order = read_resp(&c, &r) == 200 && contains(r.body, "late");
    for (int i = 1; i < 12; i++) {
        char want[32];
        snprintf(want, sizeof want, "query=i=%d ", i);
        if (read_resp(&c, &r) != 200 || !contains(r.body, want)) in_order = 0;
    }
    CHECK(in_order, "12 pipelined requests (> max_pipelined) all answered, in order");
    client_close(&c);

    /* The client half-closes right after pipelining: held-back requests still answered. */
    client_open(&c, port_main);
    send_str(&c, big);
    shutdown(c.fd, SHUT_WR);
    int answered = 0;
    while (read_resp(&c, &r) == 200) answered++;
    CHECK(answered == 12, "pipelined requests then EOF: all 12 answered before the close (%d)", answered);
    client_close(&c);
}

static void test_split_reads(void)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    const char *req = "POST /echo?split=1 HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
                      "Content-Length: 11\r\n\r\nhello world";
    for (const char *p = req; *p; p++) {
        send(c.fd, p, 1, MSG_NOSIGNAL);
        if ((p - req) % 8 == 0) sleep_ms(1);
    }
    int st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "query=split=1 ct=text/plain") &&
              contains(r.body, "body=hello world"),
          "request sent byte by byte parsed intact: %s", r.body);
    client_close(&c);
}

static void test_chunked(void)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    send_str(&c, "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n");
    int st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "len=11 body=hello world"), "chunked body decoded: %s", r.body);
    /* Keep-alive continues after a chunked request. */
    send_str(&c, "GET /echo?after=chunked HTTP/1.1\r\n\r\n");
    st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "query=after=chunked"), "keep-alive after chunked request");
    client_close(&c);
}

static void test_expect_continue(void)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    send_str(&c, "POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
    int st = read_resp(&c, &r);
    CHECK(st == 100, "Expect: 100-continue answered with 100 Continue (got %d)", st);
    send_str(&c, "ping");
    st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "body=ping"), "body after 100 Continue handled");
    client_close(&c);
}

static void expect_error(const char *what, const char *req, int want)
{
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    send_str(&c, req);
    int st = read_resp(&c, &r);
    CHECK(st == want && contains(r.head, "Connection: close"), "%s -> %d with Connection: close (got %d)",
          what, want, st);
    CHECK(closed_within(&c, 3000), "%s -> connection closed", what);
    client_close(&c);
}

static void test_limits(void)
{
    char req[16384];
    /* max_header_bytes = 2048 */
    char pad[3000];
    memset(pad, 'a', sizeof pad - 1);
    pad[sizeof pad - 1] = '\0';
    snprintf(req, sizeof req, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n", pad);
    expect_error("oversized header", req, 431);
    snprintf(req, sizeof req, "GET /echo?%s HTTP/1.1\r\nHost: t\r\n\r\n", pad);
    expect_error("oversized request target", req, 431);

    /* max_headers = 20 */
    size_t off = (size_t)snprintf(req, sizeof req, "GET /echo HTTP/1.1\r\n");
    for (int i = 0; i < 25; i++) off += (size_t)snprintf(req + off, sizeof req - off, "X-H%d: v\r\n", i);
    snprintf(req + off, sizeof req - off, "\r\n");
    expect_error("too many headers", req, 431);

    /* max_body_bytes = 1024 */
    expect_error("Content-Length over the limit",
                 "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", 413);
    /* The whole refused body is sent anyway: the 413 must still be readable. */
    off = (size_t)snprintf(req, sizeof req, "POST /echo HTTP/1.1\r\nContent-Length: 9000\r\n\r\n");
    memset(req + off, 'q', 9000);
    req[off + 9000] = '\0';
    expect_error("Content-Length over the limit, body sent anyway", req, 413);
    off = (size_t)snprintf(req, sizeof req, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 6; i++) {
        off += (size_t)snprintf(req + off, sizeof req - off, "100\r\n");
        memset(req + off, 'b', 256);
        off += 256;
        off += (size_t)snprintf(req + off, sizeof req - off, "\r\n");
    }
    snprintf(req + off, sizeof req - off, "0\r\n\r\n");
    expect_error("chunked body over the limit", req, 413);

    /* A body exactly at the limit is fine. */
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    off = (size_t)snprintf(req, sizeof req, "POST /echo HTTP/1.1\r\nContent-Length: 1024\r\n\r\n");
    memset(req + off, 'z', 1024);
    req[off + 1024] = '\0';
    send_str(&c, req);
    int st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "len=1024 "), "body of exactly max_body_bytes accepted");
    client_close(&c);

    expect_error("malformed request line", "GET /echo HTTP/1.1 junk\r\n\r\n", 400);
    expect_error("binary garbage", "\x01\x02\x03\x04\r\n\r\n", 400);
    expect_error("unknown method", "FROB /echo HTTP/1.1\r\nHost: t\r\n\r\n", 400);
    expect_error("bad chunk size", "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400);
    expect_error("Content-Length with Transfer-Encoding",
                 "POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400);

    /* An error after a good pipelined request: the good one is answered first. */
    client_open(&c, port_main);
    send_str(&c, "GET /late?ms=50 HTTP/1.1\r\n\r\nGET /x HTTP/1.1 junk\r\n\r\n");
    int s1 = read_resp(&c, &r);
    int late = contains(r.body, "late");
    int s2 = read_resp(&c, &r);
    CHECK(s1 == 200 && late && s2 == 400, "400 for a bad pipelined request comes after the earlier answer");
    client_close(&c);
}

static void test_timeouts(void)
{
    struct client c;
    struct resp r;
    /* header_timeout = 200 ms: a head that never completes */
    client_open(&c, port_main);
    uint64_t t0 = now_ms();
    send_str(&c, "GET /echo HTTP/1.1\r\nHost: t\r\n");
    int st = read_resp(&c, &r);
    CHECK(st == 408, "incomplete head -> 408 (got %d)", st);
    CHECK(closed_within(&c, 3000) && now_ms() - t0 < 2500, "incomplete head -> connection closed");
    client_close(&c);

    /* Slowloris: bytes keep coming, but the head as a whole takes too long. */
    client_open(&c, port_main);
    t0 = now_ms();
    send_str(&c, "GET /echo HTTP/1.1\r\n");
    int got = 0;
    for (int i = 0; i < 10; i++) {
        sleep_ms(50);
        if (send_str(&c, "X-A: b\r\n") < 0) break;
    }
    st = read_resp(&c, &r);
    got = st == 408 && now_ms() - t0 < 2500;
    CHECK(got, "slowloris head (a header every 50 ms) -> 408 within the header timeout (got %d)", st);
    client_close(&c);

    /* request_timeout = 1200 ms: a body trickled every 100 ms (each byte restarts the 500 ms
     * progress timer) is cut off with 408 once the whole request took too long. */
    client_open(&c, port_main);
    t0 = now_ms();
    send_str(&c, "POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n");
    for (int i = 0; i < 25; i++) {
        sleep_ms(100);
        if (send_str(&c, "x") < 0) break;
    }
    st = read_resp(&c, &r);
    CHECK(st == 408 && contains(r.body, "request_timeout"),
          "body trickled a byte per 100 ms -> 408 by the request timeout (got %d)", st);
    client_close(&c);

    /* idle_timeout = 500 ms: closes a quiet keep-alive connection silently. */
    client_open(&c, port_main);
    send_str(&c, "GET /echo HTTP/1.1\r\n\r\n");
    st = read_resp(&c, &r);
    t0 = now_ms();
    int closed = closed_within(&c, 3000);
    uint64_t took = now_ms() - t0;
    CHECK(st == 200 && closed && took >= 300 && c.len == 0, "idle keep-alive connection closed silently after the idle timeout (%llu ms)",
          (unsigned long long)took);
    client_close(&c);
}

static void test_max_connections(void)
{
    struct client a, b, x;
    struct resp r;
    client_open(&a, port_small);
    client_open(&b, port_small);
    send_str(&a, "GET /echo HTTP/1.1\r\n\r\n");
    send_str(&b, "GET /echo HTTP/1.1\r\n\r\n");
    int ok = read_resp(&a, &r) == 200 && read_resp(&b, &r) == 200;
    CHECK(ok, "two connections within max_connections=2 served");
    client_open(&x, port_small);
    send_str(&x, "GET /echo HTTP/1.1\r\n\r\n");
    int st = read_resp(&x, &r);
    CHECK(st == 503 && contains(r.head, "Retry-After: 1") && contains(r.head, "Connection: close"),
          "third connection answered 503 with Retry-After (got %d)", st);
    CHECK(closed_within(&x, 3000), "third connection closed");
    client_close(&x);
    client_close(&a);
    /* Once one leaves, a new connection is served again (the server notices the close). */
    int served = 0;
    for (int i = 0; i < 20 && !served; i++) {
        sleep_ms(50);
        client_open(&x, port_small);
        send_str(&x, "GET /echo HTTP/1.1\r\n\r\n");
        served = read_resp(&x, &r) == 200;
        client_close(&x);
    }
    CHECK(served, "after a connection closes, new connections are served again");
    client_close(&b);
}

static unsigned pending_now(void)
{
    struct client c;
    struct resp r;
    unsigned v = 9999;
    client_open(&c, port_main);
    send_str(&c, "GET /pending HTTP/1.1\r\n\r\n");
    if (read_resp(&c, &r) == 200) sscanf(r.body, "pending=%u", &v);
    client_close(&c);
    return v;
}

static void test_disconnect(void)
{
    struct client c;
    client_open(&c, port_main);
    send_str(&c, "POST /hold HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    sleep_ms(50);
    client_close(&c); /* gone before the handler answers */
    struct client d;
    client_open(&d, port_main);
    send_str(&d, "GET /hold HTTP/1.1\r\n\r\nGET /echo?behind=hold HTTP/1.1\r\n\r\n");
    sleep_ms(100);
    unsigned before = pending_now();
    CHECK(before == 2, "requests held by the handler are pending (%u)", before);
    client_close(&d); /* the client gives up while the handler still owns the request */
    sleep_ms(100);
    run_on_loop(release_held); /* the handler answers requests whose client has gone */
    unsigned after = pending_now();
    CHECK(after == 0, "late answers to gone clients are discarded, nothing pending (%u)", after);
    struct client e;
    struct resp r;
    client_open(&e, port_main);
    send_str(&e, "GET /echo?still=alive HTTP/1.1\r\n\r\n");
    CHECK(read_resp(&e, &r) == 200, "server healthy after clients vanished mid-request");
    client_close(&e);
}

static void test_pipeline_pause(void)
{
    /* max_pipelined = 4: of 6 pipelined requests the handler sees 4 until they are answered. */
    struct client c;
    struct resp r;
    client_open(&c, port_main);
    char req[1024];
    size_t off = 0;
    for (int i = 0; i < 6; i++)
        off += (size_t)snprintf(req + off, sizeof req - off, "GET /hold?i=%d HTTP/1.1\r\n\r\n", i);
    send_str(&c, req);
    sleep_ms(100);
    unsigned p1 = pending_now();
    CHECK(p1 == 4, "6 pipelined held requests: the handler sees max_pipelined=4 of them (%u)", p1);
    run_on_loop(release_held);
    int got = 0;
    for (int i = 0; i < 4; i++) got += read_resp(&c, &r) == 200;
    sleep_ms(100);
    unsigned p2 = pending_now();
    CHECK(got == 4 && p2 == 2, "after answering them, parsing resumes: 4 answers, 2 more pending (%d, %u)", got, p2);
    run_on_loop(release_held);
    got = 0;
    for (int i = 0; i < 2; i++) got += read_resp(&c, &r) == 200;
    CHECK(got == 2, "the last 2 answered");
    client_close(&c);
}

static void test_graceful_close(void)
{
    struct client c, idle;
    struct resp r;
    client_open(&idle, port_main);
    send_str(&idle, "GET /echo HTTP/1.1\r\n\r\n");
    read_resp(&idle, &r);
    client_open(&c, port_main);
    send_str(&c, "GET /late?ms=300 HTTP/1.1\r\n\r\n");
    sleep_ms(50);
    run_on_loop(close_main);
    CHECK(closed_within(&idle, 2000), "graceful close: idle keep-alive connection closed at once");
    int st = read_resp(&c, &r);
    CHECK(st == 200 && contains(r.body, "late"), "graceful close: in-flight request still answered (got %d)", st);
    CHECK(closed_within(&c, 3000), "graceful close: its connection closed after the answer");
    client_close(&c);
    client_close(&idle);
    for (int i = 0; i < 60 && !done_main; i++) sleep_ms(50);
    CHECK(done_main == 1, "graceful close: done callback ran once every connection closed");
    struct client n;
    CHECK(client_open(&n, port_main) != 0, "graceful close: no longer accepting");
    client_close(&n);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    uv_async_init(&loop, &wakeup, on_wakeup);
    struct http_limits lim = {
        .max_connections = 64,
        .max_header_bytes = 2048,
        .max_headers = 20,
        .max_body_bytes = 1024,
        .max_pipelined = 4,
        .idle_timeout_ms = 500,
        .header_timeout_ms = 200,
        .request_timeout_ms = 1200,
    };
    int rc = http_server_start(&srv_main, &loop, "127.0.0.1:0", &lim, handler, &srv_main);
    CHECK(rc == 0, "server starts on 127.0.0.1:0 (%d)", rc);
    lim.max_connections = 2;
    lim.idle_timeout_ms = 5000;
    lim.overflow_reject = true; /* the backlog default is tested in test_http_limits.py */
    rc = http_server_start(&srv_small, &loop, "127.0.0.1:0", &lim, handler, &srv_small);
    CHECK(rc == 0, "second server starts (%d)", rc);
    if (!srv_main || !srv_small) return 1;
    port_main = http_server_port(srv_main);
    port_small = http_server_port(srv_small);
    CHECK(port_main > 0 && port_small > 0 && port_main != port_small, "port 0 picks real ports");

    pthread_t th;
    pthread_create(&th, NULL, loop_thread, NULL);

    test_simple();
    test_http10_and_close();
    test_pipelining();
    test_split_reads();
    test_chunked();
    test_expect_continue();
    test_limits();
    test_timeouts();
    test_max_connections();
    test_disconnect();
    test_pipeline_pause();
    test_graceful_close();

    run_on_loop(close_small);
    run_on_loop(close_async);
    pthread_join(th, NULL);
    CHECK(done_small == 1, "second server closed");
    CHECK(uv_loop_close(&loop) == 0, "every handle closed (uv_loop_close succeeds)");
    return CHECK_SUMMARY();
}
