/* loadgen: the rush load for ticketd's benches, on one libuv loop.
 *
 * Open-loop by default: requests are scheduled at the configured rate whether or not earlier
 * ones were answered, and latency is measured from each request's *intended* send time, so
 * an overloaded server shows its queueing in p99 instead of hiding it (coordinated omission).
 * --rate 0 is closed-loop (each connection sends its next request on the previous answer).
 *
 * The mix models a ticket opening: unique valid applications, ~5% re-submits of an earlier
 * (event, phone) without its key (409 expected), ~1% invalid bodies (400 expected), and
 * clients that retry a timed-out request with the same Idempotency-Key (a 201 replay).
 * Profile: --idle seconds of nothing, a linear --ramp to --rate, --duration at the peak, then
 * --tail seconds at --tail-rate.
 *
 * --crowd: every connection is one person after another (closed loop per connection, only new
 * applications): each sends its application, and on a 503 waits for Retry-After with jitter
 * (x0.5-1.5) and sends it again with the same Idempotency-Key; on a timeout or a lost
 * connection it reconnects after a jittered pause and does the same. New people stop at the
 * end of --duration; the ones still trying keep at it (up to --give-up seconds) so the run
 * shows when every person got in (time_all_in_s after the end of the peak).
 *
 * Tens of thousands of connections: the soft RLIMIT_NOFILE is raised to the hard limit, and
 * --sources N binds connection i to 127.0.0.(1 + i % N) (any 127/8 address is loopback) so the
 * ephemeral ports of one source address do not run out.
 *
 * Output: a JSON document (--json FILE or stdout) with totals, latency percentiles and one
 * entry per second; the application key (phone digits) of every 201 goes to --ids FILE (one
 * per line) so the bench can check, by lookup, that the DB holds exactly one row per person
 * answered 201: nothing here depends on the body of an answer, only on its status. */
#include <errno.h>
#include <getopt.h>
#include <llhttp.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define HIST_BUCKETS 1024
#define MAX_SECONDS 3600
#define BODY_MAX 512

struct hist {
    uint64_t n[HIST_BUCKETS];
    uint64_t count;
};

static unsigned hist_index(uint64_t us) {
    if (us < 64) return (unsigned)us;
    unsigned e = 63u - (unsigned)__builtin_clzll(us) - 5u; /* us >> e in [32, 64) */
    unsigned i = e * 32u + (unsigned)(us >> e);
    return i < HIST_BUCKETS ? i : HIST_BUCKETS - 1;
}

static uint64_t hist_value(unsigned i) {
    if (i < 64) return i;
    unsigned e = i / 32u - 1u;
    return (uint64_t)(i - e * 32u) << e;
}

static void hist_add(struct hist *h, uint64_t us) {
    h->n[hist_index(us)]++;
    h->count++;
}

static double hist_pct(const struct hist *h, double p) {
    if (h->count == 0) return 0;
    uint64_t want = (uint64_t)ceil(p / 100.0 * (double)h->count), seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->n[i];
        if (seen >= want && want > 0) return (double)hist_value(i) / 1000.0; /* ms */
    }
    return (double)hist_value(HIST_BUCKETS - 1) / 1000.0;
}

enum kind { K_NEW, K_DUP, K_INVALID, K_RETRY };

struct second {
    uint64_t sent;
    uint64_t s201, s409, s400, s503, s429, other, errors, timeouts, persons_in;
    struct hist lat;
};

struct opts {
    char host[64];
    int port;
    int connections;
    double rate, tail_rate;
    double idle_s, ramp_s, duration_s, tail_s;
    uint64_t total;          /* stop scheduling after this many (0 = by time) */
    double dup_pct, invalid_pct, retry_pct;
    uint64_t phone_offset;
    char event_id[65];
    int timeout_ms;
    bool crowd;
    int sources;             /* source addresses 127.0.0.1..N (loopback targets only) */
    double give_up_s;        /* crowd: seconds after the peak before unfinished people stop */
    const char *json_path, *ids_path;
};

struct request {
    enum kind kind;
    uint64_t seq;            /* phone number index for NEW/RETRY/DUP */
    uint64_t intended_ns;    /* this attempt (latency is measured from it) */
    uint64_t first_ns;       /* crowd: the person's first attempt */
    int attempts;
    struct request *next;
};

/* One per uv_write: a connection may read its answer (and send the next request) before
 * libuv has run the previous write's callback, so neither the request nor its bytes can be
 * reused until then (reusing them corrupted libuv's write queue with >= 1,500 connections). */
struct write_ctx {
    uv_write_t req;
    struct conn *c;
    char buf[1024];
};

struct conn {
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    uv_timer_t timer;
    llhttp_t parser;
    char body[BODY_MAX];
    size_t body_len;
    int retry_after_s;       /* from the answer being parsed, -1 if none */
    bool hdr_retry_after;    /* the header field being parsed is Retry-After */
    bool connected, busy, closing, done_msg, connect_failed, waiting;
    bool tcp_open;           /* tcp initialised and not yet closed */
    struct request *req;
    int index;
    int next_idle;           /* free list of connected, idle connections (-1 = end) */
    bool in_idle;
};

static struct opts o = {
    .host = "127.0.0.1", .port = 8080, .connections = 64, .rate = 20000, .tail_rate = 0,
    .idle_s = 0, .ramp_s = 1, .duration_s = 10, .tail_s = 0, .dup_pct = 5, .invalid_pct = 1,
    .retry_pct = 0.5, .event_id = "rush-2026", .timeout_ms = 2000, .sources = 1, .give_up_s = 120,
};

static uv_loop_t *loop;
static struct conn *conns;
static uv_timer_t tick;
static uint64_t start_ns, scheduled, completed, inflight, next_seq, max_backlog;
static struct request *queue_head, *queue_tail;
static uint64_t queue_len;
static struct second *seconds;
static struct hist total_lat, lat_201, lat_503, person_lat;
static FILE *ids_out;
static llhttp_settings_t parser_settings;
static char read_buf[65536]; /* one for all: each read is parsed before the next */
static int idle_head = -1, conns_started;
static uint64_t persons_started, persons_in, persons_given_up, persons_active, last_in_ns,
    connect_errors, connect_timeouts, write_errors;
static bool persons_done;    /* crowd: no new people */
static bool scheduling_done, stopping;
static uint64_t prev_tick_ns;
static unsigned rng_state = 0x9e3779b9u;

static unsigned rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static double profile_total_s(void) { return o.idle_s + o.ramp_s + o.duration_s + o.tail_s; }

/* Requests that should have been scheduled by time t (seconds since start): the integral of
 * the rate profile. */
static double due_by(double t) {
    double due = 0, r = o.rate;
    if (t <= o.idle_s) return 0;
    t -= o.idle_s;
    if (o.ramp_s > 0) {
        double x = t < o.ramp_s ? t : o.ramp_s;
        due += r * x * x / (2 * o.ramp_s);
        t -= x;
        if (t <= 0) return due;
    }
    double x = t < o.duration_s ? t : o.duration_s;
    due += r * x;
    t -= x;
    if (t <= 0) return due;
    x = t < o.tail_s ? t : o.tail_s;
    return due + o.tail_rate * x;
}

static struct second *sec_at(uint64_t ns) {
    uint64_t s = (ns - start_ns) / 1000000000ull;
    return &seconds[s < MAX_SECONDS ? s : MAX_SECONDS - 1];
}

static void enqueue(struct request *r) {
    r->next = NULL;
    if (queue_tail) queue_tail->next = r; else queue_head = r;
    queue_tail = r;
    queue_len++;
    if (queue_len > max_backlog) max_backlog = queue_len;
}

static struct request *dequeue(void) {
    struct request *r = queue_head;
    if (!r) return NULL;
    queue_head = r->next;
    if (!queue_head) queue_tail = NULL;
    queue_len--;
    return r;
}

static struct request *make_request(uint64_t intended) {
    struct request *r = calloc(1, sizeof *r);
    double x = (rnd() % 100000) / 1000.0;
    r->intended_ns = intended;
    if (next_seq > 10 && x < o.dup_pct) {
        r->kind = K_DUP;
        r->seq = rnd() % next_seq;
    } else if (x < o.dup_pct + o.invalid_pct) {
        r->kind = K_INVALID;
    } else if (next_seq > 10 && x < o.dup_pct + o.invalid_pct + o.retry_pct) {
        r->kind = K_RETRY;
        r->seq = rnd() % next_seq;
    } else {
        r->kind = K_NEW;
        r->seq = next_seq++;
    }
    return r;
}

static size_t format_request(struct request *r, char *buf, size_t cap) {
    char body[BODY_MAX], key[128] = "";
    uint64_t n = (o.phone_offset + r->seq) % 100000000ull;
    int blen;
    if (r->kind == K_INVALID) {
        blen = snprintf(body, sizeof body, "{\"event_id\":\"%s\",\"phone\":\"12-34\",\"name\":\"\"}",
                        o.event_id);
    } else {
        blen = snprintf(body, sizeof body,
                        "{\"event_id\":\"%s\",\"phone\":\"010-%04llu-%04llu\",\"name\":\"Applicant %llu\","
                        "\"email\":\"a%llu@example.com\",\"seats\":%d}",
                        o.event_id, (unsigned long long)(n / 10000), (unsigned long long)(n % 10000),
                        (unsigned long long)r->seq, (unsigned long long)r->seq, (int)(r->seq % 4) + 1);
        /* NEW and RETRY carry the key a real client would reuse on retry; DUP is a second,
         * independent submit (no key) that must get 409. */
        if (r->kind != K_DUP)
            snprintf(key, sizeof key, "Idempotency-Key: %s-%llu\r\n", o.event_id,
                     (unsigned long long)r->seq);
    }
    int n2 = snprintf(buf, cap,
                      "POST /v1/applications HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                      "%sContent-Length: %d\r\n\r\n%s",
                      o.host, key, blen, body);
    return (size_t)n2;
}

static void conn_start(struct conn *c);
static void conn_send(struct conn *c, struct request *r);
static void dispatch(void);

static double jitter(void) { return 0.5 + (rnd() % 1000) / 1000.0; } /* x0.5 .. x1.5 */

static void phone_digits(const struct request *r, char out[16]) {
    uint64_t n = (o.phone_offset + r->seq) % 100000000ull;
    snprintf(out, 16, "010%08llu", (unsigned long long)n);
}

static void record(struct conn *c, int status, bool timed_out) {
    uint64_t now = uv_hrtime();
    struct request *r = c->req;
    struct second *s = sec_at(now);
    uint64_t us = (now - r->intended_ns) / 1000;
    if (status == 0) {
        s->errors++;
        if (timed_out) s->timeouts++;
    } else {
        hist_add(&s->lat, us);
        hist_add(&total_lat, us);
        switch (status) {
        case 201: s->s201++; hist_add(&lat_201, us); break;
        case 409: s->s409++; break;
        case 400: s->s400++; break;
        case 503: s->s503++; hist_add(&lat_503, us); break;
        case 429: s->s429++; break;
        default: s->other++; break;
        }
        if (status == 201 && ids_out) {
            char ph[16];
            phone_digits(r, ph);
            fprintf(ids_out, "%s\n", ph);
        }
    }
}

static void idle_push(struct conn *c) {
    if (c->in_idle) return;
    c->in_idle = true;
    c->next_idle = idle_head;
    idle_head = c->index;
}

static void finish_request(struct conn *c) {
    free(c->req);
    c->req = NULL;
    c->busy = false;
    completed++;
    inflight--;
}

/* crowd: the person on c got a final answer (or gave up). */
static void person_done(struct conn *c, bool got_in) {
    uint64_t now = uv_hrtime();
    if (got_in) {
        persons_in++;
        sec_at(now)->persons_in++;
        hist_add(&person_lat, (now - c->req->first_ns) / 1000);
        last_in_ns = now;
    }
    persons_active--;
    finish_request(c);
}

/* crowd: the next person on this connection, while the peak lasts. */
static struct request *next_person(void) {
    if (persons_done) return NULL;
    struct request *r = calloc(1, sizeof *r);
    r->kind = K_NEW;
    r->seq = next_seq++;
    r->first_ns = r->intended_ns = uv_hrtime();
    persons_started++;
    persons_active++;
    scheduled++;
    return r;
}

static void on_retry_connect(uv_timer_t *t) { conn_start(t->data); }

static void on_close(uv_handle_t *h) {
    struct conn *c = h->data;
    c->closing = false;
    c->connected = false;
    c->tcp_open = false;
    if (stopping) return;
    if (o.crowd) {
        if (!c->req) conn_start(c); /* the person left: the next one arrives */
        else if (!uv_is_active((uv_handle_t *)&c->timer)) /* reconnecting: a jittered pause */
            uv_timer_start(&c->timer, on_retry_connect, (uint64_t)(250 * jitter()), 0);
        return;
    }
    if (c->connect_failed) /* server not there (yet): do not spin */
        uv_timer_start(&c->timer, on_retry_connect, 100, 0);
    else
        conn_start(c);
}

static void conn_fail(struct conn *c, bool timed_out) {
    if (c->closing) return;
    uv_timer_stop(&c->timer);
    c->waiting = false;
    if (c->req && c->busy) {
        record(c, 0, timed_out);
        if (o.crowd) {
            /* keep the person: resent with the same key once reconnected */
            c->busy = false;
            inflight--;
        } else if (c->req->attempts < 2 && c->req->kind != K_INVALID) {
            /* A client whose request failed or timed out retries it once with the same
             * Idempotency-Key (a new connection), as real clients of a rush do. */
            struct request *r = c->req;
            c->req = NULL;
            c->busy = false;
            inflight--;
            r->kind = r->kind == K_DUP ? K_DUP : K_RETRY;
            enqueue(r);
        } else {
            finish_request(c);
        }
    }
    c->closing = true;
    c->tcp.data = c;
    uv_close((uv_handle_t *)&c->tcp, on_close);
}

static void on_timeout(uv_timer_t *t) {
    struct conn *c = t->data;
    if (!c->connected) connect_timeouts++; /* still connecting after the timeout */
    conn_fail(c, true);
}

static void on_retry_send(uv_timer_t *t) {
    struct conn *c = t->data;
    c->waiting = false;
    c->req->intended_ns = uv_hrtime();
    if (c->connected && !c->closing) conn_send(c, c->req);
    /* else: on_connect sends it */
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
    struct conn *c = p->data;
    c->hdr_retry_after = len == 11 && strncasecmp(at, "Retry-After", 11) == 0;
    return 0;
}
static int on_header_value(llhttp_t *p, const char *at, size_t len) {
    struct conn *c = p->data;
    if (c->hdr_retry_after && len > 0 && len < 8) {
        char v[8];
        memcpy(v, at, len);
        v[len] = 0;
        c->retry_after_s = atoi(v);
    }
    return 0;
}
static int on_body(llhttp_t *p, const char *at, size_t len) {
    struct conn *c = p->data;
    size_t room = BODY_MAX - 1 - c->body_len;
    if (len > room) len = room;
    memcpy(c->body + c->body_len, at, len);
    c->body_len += len;
    c->body[c->body_len] = 0;
    return 0;
}
static int on_message_complete(llhttp_t *p) {
    struct conn *c = p->data;
    c->done_msg = true;
    return HPE_PAUSED;
}

static void alloc_cb(uv_handle_t *h, size_t sz, uv_buf_t *buf) {
    (void)h;
    (void)sz;
    buf->base = read_buf;
    buf->len = sizeof read_buf;
}

/* crowd: what the person on c does with this answer. Returns false when c was closed. */
static bool crowd_answer(struct conn *c, int status, bool keep) {
    if (status == 201 || status == 409 || status == 400) {
        /* done: the person leaves (their connection with them); a new one arrives on a
         * connection of their own */
        person_done(c, status != 400);
        uv_timer_stop(&c->timer);
        c->closing = true;
        /* An abortive close (RST): on one machine the clients' TIME_WAIT sockets would
         * otherwise fill the ephemeral ports and make every connect() search for one;
         * the answer is read already, so the server loses nothing. */
        if (uv_tcp_close_reset(&c->tcp, on_close) != 0) uv_close((uv_handle_t *)&c->tcp, on_close);
        return false;
    }
    /* 503 (or anything else): wait Retry-After with jitter, then the same application
     * with the same Idempotency-Key. */
    int ra = c->retry_after_s >= 0 ? c->retry_after_s : 1;
    c->busy = false;
    inflight--;
    c->waiting = true;
    if (!keep) {
        c->waiting = false; /* the reconnect pause comes first; then the send */
        conn_fail(c, false);
        uv_timer_start(&c->timer, on_retry_connect, (uint64_t)(1000.0 * (ra ? ra : 1) * jitter()), 0);
        return false;
    }
    uv_timer_start(&c->timer, on_retry_send, (uint64_t)(1000.0 * (ra ? ra : 1) * jitter()), 0);
    return true;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    struct conn *c = s->data;
    if (nread < 0) {
        conn_fail(c, false);
        return;
    }
    const char *p = buf->base;
    size_t left = (size_t)nread;
    while (left > 0) {
        if (!c->req || !c->busy) { conn_fail(c, false); return; } /* unsolicited bytes */
        enum llhttp_errno err = llhttp_execute(&c->parser, p, left);
        size_t used = left;
        if (err == HPE_PAUSED) {
            used = (size_t)(llhttp_get_error_pos(&c->parser) - p);
            llhttp_resume(&c->parser);
        } else if (err != HPE_OK) {
            conn_fail(c, false);
            return;
        }
        p += used;
        left -= used;
        if (c->done_msg) {
            c->done_msg = false;
            uv_timer_stop(&c->timer);
            int status = (int)c->parser.status_code;
            record(c, status, false);
            bool keep = llhttp_should_keep_alive(&c->parser);
            if (o.crowd) {
                if (!crowd_answer(c, status, keep)) return;
                continue;
            }
            finish_request(c);
            if (o.rate <= 0 && !scheduling_done && (!o.total || scheduled < o.total)) {
                enqueue(make_request(uv_hrtime())); /* closed loop: next one at once */
                scheduled++;
            }
            if (!keep) {
                conn_fail(c, false);
                return;
            }
            idle_push(c);
        }
    }
    dispatch();
}

static void on_write(uv_write_t *w, int status) {
    struct write_ctx *wc = (struct write_ctx *)w;
    struct conn *c = wc->c;
    free(wc);
    if (status < 0 && status != UV_ECANCELED) {
        write_errors++;
        conn_fail(c, false);
    }
}

static void conn_send(struct conn *c, struct request *r) {
    c->req = r;
    c->busy = true;
    r->attempts++;
    inflight++;
    c->body_len = 0;
    c->body[0] = 0;
    c->retry_after_s = -1;
    llhttp_init(&c->parser, HTTP_RESPONSE, &parser_settings);
    c->parser.data = c;
    struct write_ctx *w = malloc(sizeof *w);
    w->c = c;
    size_t n = format_request(r, w->buf, sizeof w->buf);
    uv_buf_t b = uv_buf_init(w->buf, (unsigned)n);
    sec_at(uv_hrtime())->sent++;
    uv_timer_start(&c->timer, on_timeout, (uint64_t)o.timeout_ms, 0);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        free(w);
        conn_fail(c, false);
    }
}

static void dispatch(void) {
    if (o.crowd) return;
    while (queue_head && idle_head >= 0) {
        struct conn *c = &conns[idle_head];
        idle_head = c->next_idle;
        c->in_idle = false;
        if (c->connected && !c->busy && !c->closing) conn_send(c, dequeue());
    }
}

static void on_connect(uv_connect_t *req, int status) {
    struct conn *c = req->data;
    if (status == UV_ECANCELED || stopping || c->closing) return; /* closed meanwhile */
    c->connect_failed = status < 0;
    if (status < 0) {
        connect_errors++;
        uv_timer_stop(&c->timer);
        c->closing = true;
        uv_close((uv_handle_t *)&c->tcp, on_close);
        return;
    }
    uv_timer_stop(&c->timer);
    c->connected = true;
    uv_tcp_nodelay(&c->tcp, 1);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read);
    if (o.crowd) {
        if (c->req && !c->waiting) conn_send(c, c->req);
        return;
    }
    if (o.rate <= 0 && !scheduling_done) { /* closed loop: keep every connection busy */
        enqueue(make_request(uv_hrtime()));
        scheduled++;
    }
    idle_push(c);
    dispatch();
}

static void conn_start(struct conn *c) {
    if (o.crowd) { /* a person arrives (or tries again): the connect counts in the wait */
        if (!c->req) c->req = next_person();
        if (!c->req) return;
        if (!c->waiting) c->req->intended_ns = uv_hrtime();
    }
    struct sockaddr_in addr;
    uv_ip4_addr(o.host, o.port, &addr);
    uv_tcp_init(loop, &c->tcp);
    c->tcp_open = true;
    c->tcp.data = c;
    c->connect_req.data = c;
    if (o.sources > 1) {
        /* IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect() for the whole 4-tuple, so
         * each source address has its own ephemeral range (a plain bind to port 0 would
         * search for a port unique to the address, slower and fewer). */
        struct sockaddr_in src;
        char ip[32];
        snprintf(ip, sizeof ip, "127.0.0.%d", 1 + c->index % o.sources);
        uv_ip4_addr(ip, 0, &src);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
        if (fd >= 0) {
#ifdef IP_BIND_ADDRESS_NO_PORT
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
            if (bind(fd, (const struct sockaddr *)&src, sizeof src) != 0 ||
                uv_tcp_open(&c->tcp, fd) != 0)
                close(fd);
        }
    }
    if (uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr *)&addr, on_connect) != 0) {
        connect_errors++;
        c->connect_failed = true;
        c->closing = true;
        uv_close((uv_handle_t *)&c->tcp, on_close);
        return;
    }
    /* A connect that waits (the server's accept queue full, SYNs retried) counts against
     * the request timeout like an unanswered request. */
    if (o.crowd) uv_timer_start(&c->timer, on_timeout, (uint64_t)o.timeout_ms, 0);
}

static void stop_all(void) {
    stopping = true;
    uv_timer_stop(&tick);
    uv_close((uv_handle_t *)&tick, NULL);
    for (int i = 0; i < o.connections; i++) {
        struct conn *c = &conns[i];
        uv_timer_stop(&c->timer);
        uv_close((uv_handle_t *)&c->timer, NULL);
        if (c->tcp_open && !c->closing) {
            c->closing = true;
            uv_close((uv_handle_t *)&c->tcp, NULL);
        }
        if (o.crowd && c->req) persons_given_up++;
    }
}

static void on_tick(uv_timer_t *t) {
    (void)t;
    uint64_t now = uv_hrtime();
    double el = (double)(now - start_ns) / 1e9;
    if (o.crowd) {
        /* the crowd arrives over --idle + --ramp: connection i at its share of the ramp */
        double frac = el <= o.idle_s ? 0 : o.ramp_s > 0 ? (el - o.idle_s) / o.ramp_s : 1;
        int due = frac >= 1 ? o.connections : (int)(frac * o.connections);
        while (conns_started < due) conn_start(&conns[conns_started++]);
        if (!persons_done && el >= profile_total_s()) persons_done = scheduling_done = true;
        if (persons_done && (persons_active == 0 || el > profile_total_s() + o.give_up_s))
            stop_all();
        return;
    }
    if (!scheduling_done) {
        if (o.rate > 0) {
            uint64_t due = (uint64_t)due_by(el), first = scheduled;
            if (o.total && due > o.total) due = o.total;
            while (scheduled < due) {
                /* Intended send times spread evenly since the last tick, so a late tick
                 * (a busy loop here) still counts against latency. */
                uint64_t k = scheduled - first + 1, span = due - first;
                enqueue(make_request(prev_tick_ns + (now - prev_tick_ns) * k / span));
                scheduled++;
            }
        } else {
            for (int i = 0; i < o.connections; i++)
                if (conns[i].connected && !conns[i].busy && queue_len == 0 &&
                    (!o.total || scheduled < o.total)) {
                    enqueue(make_request(now));
                    scheduled++;
                }
        }
        if (el >= profile_total_s() || (o.total && scheduled >= o.total)) scheduling_done = true;
        dispatch();
    }
    prev_tick_ns = now;
    /* Give stragglers up to two request timeouts after the schedule ends. */
    if (scheduling_done && ((queue_len == 0 && inflight == 0) ||
                            el > profile_total_s() + 2.0 * o.timeout_ms / 1000.0 + 1))
        stop_all();
}

static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)o.connections + 16 > rl.rlim_cur)
        fprintf(stderr, "loadgen: warning: %d connections but RLIMIT_NOFILE is %llu (ulimit -n)\n",
                o.connections, (unsigned long long)rl.rlim_cur);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen [--host H] [--port P] [--connections C] [--rate R|0] [--idle S] [--ramp S]\n"
            "               [--duration S] [--tail S] [--tail-rate R] [--total N] [--dup-pct X]\n"
            "               [--invalid-pct X] [--retry-pct X] [--event-id E] [--phone-offset K]\n"
            "               [--timeout-ms T] [--json FILE] [--ids FILE]\n"
            "               [--crowd] [--sources N] [--give-up S]\n");
}

int main(int argc, char **argv) {
    static const struct option lo[] = {
        {"host", 1, 0, 'h'},       {"port", 1, 0, 'p'},        {"connections", 1, 0, 'c'},
        {"rate", 1, 0, 'r'},       {"idle", 1, 0, 'I'},        {"ramp", 1, 0, 'R'},
        {"duration", 1, 0, 'd'},   {"tail", 1, 0, 'T'},        {"tail-rate", 1, 0, 't'},
        {"total", 1, 0, 'n'},      {"dup-pct", 1, 0, 'D'},     {"invalid-pct", 1, 0, 'V'},
        {"retry-pct", 1, 0, 'Y'},  {"event-id", 1, 0, 'e'},    {"phone-offset", 1, 0, 'o'},
        {"timeout-ms", 1, 0, 'm'}, {"json", 1, 0, 'j'},        {"ids", 1, 0, 'i'},
        {"crowd", 0, 0, 'C'},      {"sources", 1, 0, 'S'},     {"give-up", 1, 0, 'G'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'h': snprintf(o.host, sizeof o.host, "%s", optarg); break;
        case 'p': o.port = atoi(optarg); break;
        case 'c': o.connections = atoi(optarg); break;
        case 'r': o.rate = atof(optarg); break;
        case 'I': o.idle_s = atof(optarg); break;
        case 'R': o.ramp_s = atof(optarg); break;
        case 'd': o.duration_s = atof(optarg); break;
        case 'T': o.tail_s = atof(optarg); break;
        case 't': o.tail_rate = atof(optarg); break;
        case 'n': o.total = strtoull(optarg, NULL, 10); break;
        case 'D': o.dup_pct = atof(optarg); break;
        case 'V': o.invalid_pct = atof(optarg); break;
        case 'Y': o.retry_pct = atof(optarg); break;
        case 'e': snprintf(o.event_id, sizeof o.event_id, "%s", optarg); break;
        case 'o': o.phone_offset = strtoull(optarg, NULL, 10); break;
        case 'm': o.timeout_ms = atoi(optarg); break;
        case 'j': o.json_path = optarg; break;
        case 'i': o.ids_path = optarg; break;
        case 'C': o.crowd = true; break;
        case 'S': o.sources = atoi(optarg); break;
        case 'G': o.give_up_s = atof(optarg); break;
        default: usage(); return 2;
        }
    }
    if (o.connections < 1 || o.port <= 0 || o.sources < 1 || o.sources > 254) {
        usage();
        return 2;
    }
    if (o.ids_path && !(ids_out = fopen(o.ids_path, "w"))) {
        perror(o.ids_path);
        return 2;
    }
    raise_fd_limit();
    llhttp_settings_init(&parser_settings);
    parser_settings.on_header_field = on_header_field;
    parser_settings.on_header_value = on_header_value;
    parser_settings.on_body = on_body;
    parser_settings.on_message_complete = on_message_complete;
    loop = uv_default_loop();
    seconds = calloc(MAX_SECONDS, sizeof *seconds);
    conns = calloc((size_t)o.connections, sizeof *conns);
    start_ns = prev_tick_ns = uv_hrtime();
    for (int i = 0; i < o.connections; i++) {
        struct conn *c = &conns[i];
        c->index = i;
        uv_timer_init(loop, &c->timer);
        c->timer.data = c;
        if (!o.crowd) conn_start(c);
    }
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, on_tick, 1, 1);
    uv_run(loop, UV_RUN_DEFAULT);
    double elapsed = (double)(uv_hrtime() - start_ns) / 1e9;

    FILE *out = o.json_path ? fopen(o.json_path, "w") : stdout;
    if (!out) {
        perror(o.json_path);
        return 2;
    }
    uint64_t t201 = 0, t409 = 0, t400 = 0, t503 = 0, t429 = 0, tother = 0, terr = 0, ttimeout = 0;
    unsigned nsec = (unsigned)ceil(elapsed);
    if (nsec > MAX_SECONDS) nsec = MAX_SECONDS;
    fprintf(out, "{\"seconds\":[");
    for (unsigned i = 0; i < nsec; i++) {
        struct second *s = &seconds[i];
        t201 += s->s201; t409 += s->s409; t400 += s->s400; t503 += s->s503; t429 += s->s429;
        tother += s->other; terr += s->errors; ttimeout += s->timeouts;
        fprintf(out,
                "%s{\"t\":%u,\"sent\":%llu,\"201\":%llu,\"409\":%llu,\"400\":%llu,\"503\":%llu,"
                "\"429\":%llu,\"other\":%llu,\"errors\":%llu,\"persons_in\":%llu,\"p50_ms\":%.3f,"
                "\"p99_ms\":%.3f,\"p999_ms\":%.3f}",
                i ? "," : "", i, (unsigned long long)s->sent, (unsigned long long)s->s201,
                (unsigned long long)s->s409, (unsigned long long)s->s400, (unsigned long long)s->s503,
                (unsigned long long)s->s429, (unsigned long long)s->other,
                (unsigned long long)s->errors, (unsigned long long)s->persons_in,
                hist_pct(&s->lat, 50), hist_pct(&s->lat, 99),
                hist_pct(&s->lat, 99.9));
    }
    fprintf(out,
            "],\"totals\":{\"scheduled\":%llu,\"completed\":%llu,\"201\":%llu,\"409\":%llu,"
            "\"400\":%llu,\"503\":%llu,\"429\":%llu,\"other\":%llu,\"errors\":%llu,\"timeouts\":%llu,"
            "\"elapsed_s\":%.3f,\"max_backlog\":%llu,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,"
            "\"max_ms\":%.3f,\"p99_201_ms\":%.3f,\"p99_503_ms\":%.3f,\"p50_201_ms\":%.3f,"
            "\"p50_503_ms\":%.3f,\"connect_errors\":%llu,\"connect_timeouts\":%llu,\"write_errors\":%llu,"
            "\"persons_started\":%llu,\"persons_in\":%llu,\"persons_given_up\":%llu,"
            "\"person_p50_ms\":%.3f,\"person_p99_ms\":%.3f,\"person_max_ms\":%.3f,"
            "\"time_all_in_s\":%.3f},\"options\":{\"crowd\":%s,\"sources\":%d,\"connections\":%d,\"rate\":%.0f,\"idle_s\":%.1f,"
            "\"ramp_s\":%.1f,\"duration_s\":%.1f,\"tail_s\":%.1f,\"tail_rate\":%.0f}}\n",
            (unsigned long long)scheduled, (unsigned long long)completed, (unsigned long long)t201,
            (unsigned long long)t409, (unsigned long long)t400, (unsigned long long)t503,
            (unsigned long long)t429, (unsigned long long)tother, (unsigned long long)terr,
            (unsigned long long)ttimeout, elapsed, (unsigned long long)max_backlog,
            hist_pct(&total_lat, 50), hist_pct(&total_lat, 99), hist_pct(&total_lat, 99.9),
            hist_pct(&total_lat, 100), hist_pct(&lat_201, 99), hist_pct(&lat_503, 99),
            hist_pct(&lat_201, 50), hist_pct(&lat_503, 50), (unsigned long long)connect_errors,
            (unsigned long long)connect_timeouts, (unsigned long long)write_errors, (unsigned long long)persons_started,
            (unsigned long long)persons_in, (unsigned long long)persons_given_up,
            hist_pct(&person_lat, 50), hist_pct(&person_lat, 99), hist_pct(&person_lat, 100),
            last_in_ns ? (double)(int64_t)(last_in_ns - start_ns) / 1e9 - profile_total_s() : 0.0,
            o.crowd ? "true" : "false", o.sources, o.connections, o.rate, o.idle_s, o.ramp_s, o.duration_s,
            o.tail_s, o.tail_rate);
    if (out != stdout) fclose(out);
    if (ids_out) fclose(ids_out);
    return 0;
}
