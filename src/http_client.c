/* http_client: libcurl multi on the loop (curl's docs/examples/multi-uv.c pattern). */
#include "http_client.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "limits.h"
#include "log.h"

struct hc_req;

/* The two lists below (requests, sockets) are intrusive and doubly linked through prev/next:
 * one push and one unlink for both. */
#define LIST_PUSH(head, node)                                                                  \
    do {                                                                                       \
        (node)->next = (head);                                                                 \
        if (head) (head)->prev = (node);                                                       \
        (head) = (node);                                                                       \
    } while (0)
#define LIST_UNLINK(head, node)                                                                \
    do {                                                                                       \
        if ((node)->prev) (node)->prev->next = (node)->next;                                   \
        else (head) = (node)->next;                                                            \
        if ((node)->next) (node)->next->prev = (node)->prev;                                   \
    } while (0)

struct hc {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    struct hc_req *reqs;        /* doubly linked list of running requests */
    struct hc_sock *socks;      /* doubly linked list of watched sockets */
    unsigned inflight;
    unsigned open_handles;      /* timer + socket polls not yet closed */
    bool closing;
    void (*close_done)(void *ud);
    void *close_ud;
};

/* One per curl socket; freed in its poll handle's close callback. */
struct hc_sock {
    uv_poll_t poll;
    struct hc *h;
    struct hc_sock *prev, *next;
    curl_socket_t fd;
};

struct hc_req {
    struct hc *h;
    struct hc_req *prev, *next;
    CURL *easy;
    struct curl_slist *headers;
    struct curl_slist *rcpts;
    char *upload;               /* request body (POST) or message (SMTP) */
    size_t upload_len, upload_pos;
    char body[HC_BODY_MAX + 1]; /* response body, truncated */
    size_t body_len;
    char errbuf[CURL_ERROR_SIZE];
    hc_done_fn cb;
    void *ud;
};

static bool curl_ready;

static void maybe_free(struct hc *h)
{
    if (h->closing && h->open_handles == 0) {
        void (*done)(void *) = h->close_done;
        void *ud = h->close_ud;
        free(h);
        if (done) done(ud);
    }
}

static void sock_on_close(uv_handle_t *handle)
{
    struct hc_sock *s = handle->data;
    struct hc *h = s->h;
    free(s);
    h->open_handles--;
    maybe_free(h);
}

static void timer_on_close(uv_handle_t *handle)
{
    struct hc *h = handle->data;
    h->open_handles--;
    maybe_free(h);
}

static void req_unlink(struct hc_req *r)
{
    struct hc *h = r->h;
    LIST_UNLINK(h->reqs, r);
    h->inflight--;
}

static void req_free(struct hc_req *r)
{
    curl_slist_free_all(r->headers);
    curl_slist_free_all(r->rcpts);
    free(r->upload);
    free(r);
}

/* Removes the easy handle, reports, frees. */
static void req_finish(struct hc_req *r, CURLcode code, const char *why)
{
    struct hc *h = r->h;
    struct hc_result res = {0};
    long status = 0;

    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(h->multi, r->easy);
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
    req_unlink(r);

    r->body[r->body_len] = '\0';
    res.curl_code = (int)code;
    res.status = status;
    if (why) res.error = why;
    else if (code == CURLE_OK) res.error = "";
    else res.error = r->errbuf[0] ? r->errbuf : curl_easy_strerror(code);
    res.body = r->body;
    res.body_len = r->body_len;
    r->cb(r->ud, &res);
    req_free(r);
}

static void check_multi_info(struct hc *h)
{
    CURLMsg *msg;
    int pending;

    while ((msg = curl_multi_info_read(h->multi, &pending))) {
        if (msg->msg != CURLMSG_DONE) continue;
        char *priv = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
        CURLcode code = msg->data.result;
        req_finish((struct hc_req *)priv, code, NULL);
    }
}

static void sock_on_event(uv_poll_t *handle, int status, int events)
{
    struct hc_sock *s = handle->data;
    struct hc *h = s->h;
    int flags = 0;
    int running;

    if (status < 0) flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(h->multi, s->fd, flags, &running);
    check_multi_info(h);
}

static void timer_on_fire(uv_timer_t *t)
{
    struct hc *h = t->data;
    int running;
    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(h);
}

/* Stops watching (before curl closes the fd) and closes the poll handle. */
static void sock_release(struct hc_sock *s)
{
    struct hc *h = s->h;
    LIST_UNLINK(h->socks, s);
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, sock_on_close);
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct hc *h = userp;
    struct hc_sock *s = socketp;

    if (what == CURL_POLL_REMOVE) {
        if (s) {
            sock_release(s);
            curl_multi_assign(h->multi, fd, NULL);
        }
        return 0;
    }
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return -1;
        s->h = h;
        s->fd = fd;
        if (uv_poll_init_socket(h->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->poll.data = s;
        h->open_handles++;
        LIST_PUSH(h->socks, s);
        curl_multi_assign(h->multi, fd, s);
    }
    int events = 0;
    if (what & CURL_POLL_IN) events |= UV_READABLE;
    if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, sock_on_event);
    return 0;
}

static int on_timer(CURLM *multi, long timeout_ms, void *userp)
{
    struct hc *h = userp;
    if (timeout_ms < 0) uv_timer_stop(&h->timer);
    else uv_timer_start(&h->timer, timer_on_fire, (uint64_t)timeout_ms, 0);
    return 0;
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct hc_req *r = userdata;
    size_t n = size * nmemb;
    size_t room = HC_BODY_MAX - r->body_len;
    size_t take = n < room ? n : room;
    memcpy(r->body + r->body_len, ptr, take);
    r->body_len += take;
    return n; /* the rest is dropped, not an error */
}

static size_t on_read(char *buf, size_t size, size_t nitems, void *userdata)
{
    struct hc_req *r = userdata;
    size_t room = size * nitems;
    size_t left = r->upload_len - r->upload_pos;
    size_t take = left < room ? left : room;
    memcpy(buf, r->upload + r->upload_pos, take);
    r->upload_pos += take;
    return take;
}

int hc_create(struct hc **out, uv_loop_t *loop)
{
    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return -EIO;
        curl_ready = true;
    }
    struct hc *h = calloc(1, sizeof *h);
    if (!h) return -ENOMEM;
    h->loop = loop;
    h->multi = curl_multi_init();
    if (!h->multi) {
        free(h);
        return -ENOMEM;
    }
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    h->open_handles = 1;
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    *out = h;
    return 0;
}

static struct hc_req *req_new(struct hc *h, const char *url, int64_t timeout_ms,
                              const char *payload, size_t len, hc_done_fn cb, void *ud)
{
    struct hc_req *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->h = h;
    r->cb = cb;
    r->ud = ud;
    r->upload = malloc(len + 1);
    r->easy = curl_easy_init();
    if (!r->upload || !r->easy) {
        if (r->easy) curl_easy_cleanup(r->easy);
        free(r->upload);
        free(r);
        return NULL;
    }
    memcpy(r->upload, payload, len);
    r->upload[len] = '\0';
    r->upload_len = len;
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    long ms = timeout_ms > 0 ? (long)timeout_ms : HC_TIMEOUT_DEFAULT_MS;
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ms);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    return r;
}

static int req_start(struct hc_req *r)
{
    struct hc *h = r->h;
    if (curl_multi_add_handle(h->multi, r->easy) != CURLM_OK) {
        curl_easy_cleanup(r->easy);
        req_free(r);
        return -EIO;
    }
    LIST_PUSH(h->reqs, r);
    h->inflight++;
    return 0;
}

int hc_post_json(struct hc *h, const char *url, const char *const *headers, size_t nheaders,
                 const char *content_type, const char *body, size_t len, int64_t timeout_ms,
                 hc_done_fn cb, void *ud)
{
    if (h->closing) return -ECANCELED;
    struct hc_req *r = req_new(h, url, timeout_ms, body, len, cb, ud);
    if (!r) return -ENOMEM;

    char ct[160];
    snprintf(ct, sizeof ct, "Content-Type: %s", content_type ? content_type : "application/json");
    struct curl_slist *l = curl_slist_append(NULL, ct);
    /* No "Expect: 100-continue" round trip for small bodies. */
    if (l) l = curl_slist_append(l, "Expect:");
    for (size_t i = 0; l && i < nheaders; i++) {
        struct curl_slist *n = curl_slist_append(l, headers[i]);
        if (!n) {
            curl_slist_free_all(l);
            l = NULL;
            break;
        }
        l = n;
    }
    if (!l) {
        curl_easy_cleanup(r->easy);
        req_free(r);
        return -ENOMEM;
    }
    r->headers = l;
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->upload);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->upload_len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    return req_start(r);
}

int hc_smtp_send(struct hc *h, const char *url, bool require_tls, const char *from,
                 const char *rcpt, const char *message, size_t len, int64_t timeout_ms,
                 hc_done_fn cb, void *ud)
{
    if (h->closing) return -ECANCELED;
    struct hc_req *r = req_new(h, url, timeout_ms, message, len, cb, ud);
    if (!r) return -ENOMEM;
    char addr[512];
    snprintf(addr, sizeof addr, "<%s>", rcpt);
    r->rcpts = curl_slist_append(NULL, addr);
    if (!r->rcpts) {
        curl_easy_cleanup(r->easy);
        req_free(r);
        return -ENOMEM;
    }
    snprintf(addr, sizeof addr, "<%s>", from);
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_MAIL_FROM, addr); /* copied by curl */
    curl_easy_setopt(e, CURLOPT_MAIL_RCPT, r->rcpts);
    curl_easy_setopt(e, CURLOPT_USE_SSL, (long)(require_tls ? CURLUSESSL_ALL : CURLUSESSL_TRY));
    curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(e, CURLOPT_READDATA, r);
    curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)r->upload_len);
    return req_start(r);
}

unsigned hc_inflight(const struct hc *h)
{
    return h->inflight;
}

void hc_close(struct hc *h, void (*done)(void *ud), void *ud)
{
    if (!h) {
        if (done) done(ud);
        return;
    }
    h->closing = true;
    h->close_done = done;
    h->close_ud = ud;
    while (h->reqs) req_finish(h->reqs, CURLE_ABORTED_BY_CALLBACK, "closing");
    /* Removing the easy handles made curl report CURL_POLL_REMOVE for their sockets; any
     * poll left (a cached connection's socket) is stopped before curl_multi_cleanup closes
     * its fd. */
    while (h->socks) {
        curl_multi_assign(h->multi, h->socks->fd, NULL);
        sock_release(h->socks);
    }
    curl_multi_cleanup(h->multi);
    h->multi = NULL;
    uv_timer_stop(&h->timer);
    uv_close((uv_handle_t *)&h->timer, timer_on_close);
}
