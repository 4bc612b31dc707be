/* libFuzzer target: arbitrary bytes through the HTTP session core (http_parse.c), no
 * sockets. The first two input bytes steer the harness (read sizes, which requests the
 * handler answers late, whether the client vanishes at the end); the rest is the byte
 * stream a client sent. Checks: no crash or leak (ASan), responses are emitted only as
 * whole, well-formed status lines, and every request handed to the handler is accounted
 * for (pending drops to 0, the session finishes or is released).
 *
 * The core is compiled into this file so that it is built with the fuzzer's coverage
 * instrumentation even though ticketd_core is not (the library member http_parse.o is then
 * never pulled from the archive, so there is no duplicate definition). */
#include "../../src/http_parse.c"

#include <stdint.h>
#include <stdio.h>

#define MAX_DEFERRED 8

static struct http_request *deferred[MAX_DEFERRED];
static int ndeferred;
static unsigned handled;
static uint8_t defer_mask;
static int released_calls;

static void answer(struct http_request *req)
{
    /* Exercise the arena: a response body built in request memory. */
    size_t n = 16 + req->path_len + req->body_len;
    char *body = http_request_alloc(req, n);
    int len = snprintf(body, n, "%s|%zu", req->path, req->body_len);
    if (len < 0) len = 0;
    if ((size_t)len >= n) len = (int)n - 1;
    http_respond(req, handled % 5 == 0 ? 201 : 200, "application/json", body, (size_t)len,
                 handled % 7 == 0 ? "Retry-After: 1\r\n" : NULL);
}

static void handler(struct http_request *req, void *ud)
{
    (void)ud;
    handled++;
    if (req->body[req->body_len] != '\0') __builtin_trap();
    if (req->path[req->path_len] != '\0') __builtin_trap();
    if (((defer_mask >> (handled % 8)) & 1) && ndeferred < MAX_DEFERRED) {
        deferred[ndeferred++] = req;
        return;
    }
    answer(req);
}

static void answer_one_deferred(void)
{
    if (ndeferred == 0) return;
    struct http_request *req = deferred[0];
    memmove(deferred, deferred + 1, (size_t)(ndeferred - 1) * sizeof deferred[0]);
    ndeferred--;
    answer(req);
}

static void on_output_ready(struct http_session *s) { (void)s; }
static void on_released(struct http_session *s) { (void)s; released_calls++; }

/* What the transport does when serviced: resume, "write" everything ready, check it. */
static void service(struct http_session *s)
{
    for (int round = 0; round < 64; round++) {
        http_session_resume(s);
        uv_buf_t bufs[16];
        unsigned nreqs;
        unsigned n = http_session_collect(s, bufs, 16, &nreqs);
        for (unsigned i = 0; i < n; i++)
            if (bufs[i].len < 12 || memcmp(bufs[i].base, "HTTP/1.1 ", 9) != 0) __builtin_trap();
        http_session_written(s, nreqs);
        if (n == 0 && !(http_session_paused(s) && s->queued < (unsigned)s->env->limits.max_pipelined))
            break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) return 0;
    uint8_t chunk_seed = data[0];
    defer_mask = data[1];
    data += 2;
    size -= 2;

    struct http_env env = {
        .limits = {.max_connections = 1, .max_header_bytes = 1024, .max_headers = 16,
                   .max_body_bytes = 4096, .max_pipelined = 4, .idle_timeout_ms = 1000,
                   .header_timeout_ms = 1000},
        .handler = handler,
        .output_ready = on_output_ready,
        .released = on_released,
    };
    struct http_session s;
    http_session_init(&s, &env, NULL);
    ndeferred = 0;
    handled = 0;
    released_calls = 0;

    size_t off = 0, step = 1 + (chunk_seed & 0x3f);
    int turn = 0;
    while (off < size) {
        size_t n = size - off < step ? size - off : step;
        http_session_feed(&s, (const char *)data + off, n);
        off += n;
        service(&s);
        if (++turn % 2 == 0) {
            answer_one_deferred();
            service(&s);
        }
        if (chunk_seed & 0x80) step = 1 + ((step * 7 + off) & 0x3f);
    }

    if (chunk_seed & 0x40) {
        /* The client vanishes with requests still held by the handler. */
        bool now = http_session_detach(&s);
        while (ndeferred) answer_one_deferred();
        if (!now && released_calls != 1) __builtin_trap();
    } else {
        if (s.paused == false && http_session_phase(&s) == HTTP_PHASE_HEAD && (chunk_seed & 0x20))
            http_session_fail(&s, 408);
        http_session_input_close(&s);
        while (ndeferred) {
            answer_one_deferred();
            service(&s);
        }
        service(&s);
        if (!http_session_finished(&s)) __builtin_trap();
        if (!http_session_detach(&s)) __builtin_trap();
    }
    if (env.pending != 0) __builtin_trap();
    http_session_destroy(&s);
    http_env_cleanup(&env);
    return 0;
}
