/* log: logfmt lines on stderr. Each line is formatted into one buffer and written whole, so
 * lines from the loop and the thread pool never interleave.
 *
 * Until log_async_start (CLI commands, start-up) a line is one blocking write(2). After it
 * (serve), lines go into a bounded buffer that a writer thread empties with blocking writes:
 * a slow or stuck reader of stderr (a log collector that stalls, a full pipe) then costs
 * dropped lines, counted in ticketd_log_dropped_total and reported in the stream once it
 * moves again, and never stalls the loop. */
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "limits.h"
#include "metrics.h"


int log_min_level = LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int log_set_level(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < (int)(sizeof level_names / sizeof level_names[0]); i++) {
        if (strcmp(name, level_names[i]) == 0) {
            log_min_level = i;
            return 0;
        }
    }
    return -1;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return; /* nowhere left to report a failed log write */
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* ---- the buffered writer ---- */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t more;    /* writer waits for lines */
    pthread_cond_t drained; /* log_flush waits for an empty buffer */
    char *buf;              /* ring of whole lines */
    size_t cap, head, len;
    bool running, writing;
    unsigned long long dropped;    /* lines dropped since start */
    unsigned long long unreported; /* dropped lines not yet reported in the stream */
    unsigned long long counted;    /* dropped lines already added to the metric */
} wq = {.mu = PTHREAD_MUTEX_INITIALIZER, .more = PTHREAD_COND_INITIALIZER,
        .drained = PTHREAD_COND_INITIALIZER};

static size_t format_prefix(char *line, size_t cap, int level, const char *module)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, cap, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ level=%s mod=%s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, (int)(ts.tv_nsec / 1000000), level_names[level],
                     module ? module : "-");
    if (n < 0) return 0;
    return (size_t)n < cap ? (size_t)n : cap - 1;
}

static void *writer_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&wq.mu);
    for (;;) {
        while (wq.len == 0 && wq.unreported == 0) pthread_cond_wait(&wq.more, &wq.mu);
        size_t n = wq.len;
        if (wq.head + n > wq.cap) n = wq.cap - wq.head; /* up to the end of the ring */
        const char *chunk = wq.buf + wq.head;
        unsigned long long lost = wq.unreported;
        wq.unreported = 0;
        wq.writing = true;
        pthread_mutex_unlock(&wq.mu);
        /* Only this thread reads the ring between head and head+n, and producers only
         * append after head+len, so the chunk is stable without the lock. */
        if (n) write_all(STDERR_FILENO, chunk, n);
        if (lost) {
            char note[160];
            size_t len = format_prefix(note, sizeof note, LOG_WARN, "log");
            int m = snprintf(note + len, sizeof note - len,
                             "event=lines_dropped count=%llu reason=stderr_not_keeping_up\n", lost);
            if (m > 0) write_all(STDERR_FILENO, note, len + (size_t)m);
        }
        pthread_mutex_lock(&wq.mu);
        wq.writing = false;
        wq.head = (wq.head + n) % wq.cap;
        wq.len -= n;
        if (wq.len == 0) pthread_cond_broadcast(&wq.drained);
    }
    return NULL;
}

/* Adds the lines dropped since the last scrape to the counter (the registry is loop-only,
 * so it is not touched from log_emit). */
static void collect_dropped(void *ud)
{
    (void)ud;
    pthread_mutex_lock(&wq.mu);
    unsigned long long delta = wq.dropped - wq.counted;
    wq.counted = wq.dropped;
    pthread_mutex_unlock(&wq.mu);
    metrics_counter_add("ticketd_log_dropped_total", NULL, (double)delta);
}

int log_async_start(size_t buffer_bytes)
{
    if (wq.running) return 0;
    if (buffer_bytes < LOG_LINE_MAX) buffer_bytes = LOG_LINE_MAX;
    char *buf = malloc(buffer_bytes);
    if (!buf) return -ENOMEM;
    pthread_mutex_lock(&wq.mu);
    wq.buf = buf;
    wq.cap = buffer_bytes;
    wq.head = wq.len = 0;
    pthread_mutex_unlock(&wq.mu);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, writer_main, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        wq.buf = NULL;
        free(buf);
        return -rc;
    }
    wq.running = true; /* from here on log_emit only appends */
    metrics_describe("ticketd_log_dropped_total", "counter",
                     "Log lines dropped because stderr did not keep up (LOG_BUFFER full)");
    metrics_counter_add("ticketd_log_dropped_total", NULL, 0);
    metrics_add_collector(collect_dropped, NULL);
    return 0;
}

bool log_flush(int timeout_ms)
{
    if (!wq.running) return true;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&wq.mu);
    while ((wq.len > 0 || wq.writing) &&
           pthread_cond_timedwait(&wq.drained, &wq.mu, &deadline) == 0) {
    }
    bool empty = wq.len == 0 && !wq.writing;
    pthread_mutex_unlock(&wq.mu);
    return empty;
}

unsigned long long log_dropped_lines(void)
{
    pthread_mutex_lock(&wq.mu);
    unsigned long long n = wq.dropped;
    pthread_mutex_unlock(&wq.mu);
    return n;
}

/* Appends a whole line, or drops it when it does not fit. */
static void enqueue(const char *line, size_t len)
{
    pthread_mutex_lock(&wq.mu);
    if (wq.cap - wq.len < len) {
        wq.dropped++;
        wq.unreported++;
    } else {
        size_t tail = (wq.head + wq.len) % wq.cap;
        size_t first = len < wq.cap - tail ? len : wq.cap - tail;
        memcpy(wq.buf + tail, line, first);
        memcpy(wq.buf, line + first, len - first);
        wq.len += len;
        pthread_cond_signal(&wq.more);
    }
    pthread_mutex_unlock(&wq.mu);
}

void log_emit(int level, const char *module, const char *fmt, ...)
{
    char line[LOG_LINE_MAX];

    if (level < LOG_DEBUG) level = LOG_DEBUG;
    if (level > LOG_ERROR) level = LOG_ERROR;
    size_t len = format_prefix(line, sizeof line, level, module);

    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + len, sizeof line - len, fmt, ap);
    va_end(ap);
    if (m > 0) {
        size_t start = len;
        len += (size_t)m;
        if (len > sizeof line - 2) len = sizeof line - 2; /* truncated: keep room for '\n' */
        /* A message must stay on one line: embedded newlines would forge log lines. */
        for (size_t i = start; i < len; i++)
            if (line[i] == '\n' || line[i] == '\r') line[i] = ' ';
    }
    while (len > 0 && line[len - 1] == ' ') len--;
    line[len++] = '\n';
    if (wq.running) enqueue(line, len);
    else write_all(STDERR_FILENO, line, len);
}

void log_mask_phone(const char *phone, char *out, size_t outlen)
{
    char digits[16];
    size_t nd = 0;
    int ok = phone != NULL;

    if (!out || outlen == 0) return;
    for (const char *p = phone; ok && *p; p++) {
        if (*p >= '0' && *p <= '9') {
            if (nd >= 11) ok = 0;
            else digits[nd++] = *p;
        } else if (*p != '-') {
            ok = 0;
        }
    }
    if (ok && (nd == 11 || nd == 10) && digits[0] == '0' && digits[1] == '1') {
        const char *last4 = digits + nd - 4;
        if (nd == 11)
            snprintf(out, outlen, "%.3s-****-%.4s", digits, last4);
        else
            snprintf(out, outlen, "%.3s-***-%.4s", digits, last4);
        return;
    }
    snprintf(out, outlen, "***");
}

void log_quote(const char *s, char *out, size_t outlen)
{
    size_t o = 0;

    if (!out || outlen == 0) return;
    if (outlen < 3) {
        out[0] = '\0';
        return;
    }
    out[o++] = '"';
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p < 0x20 || *p == 0x7f) continue;
        size_t need = (*p == '"' || *p == '\\') ? 2 : 1;
        if (o + need + 2 > outlen) break; /* keep room for closing quote and NUL */
        if (need == 2) out[o++] = '\\';
        out[o++] = (char)*p;
    }
    out[o++] = '"';
    out[o] = '\0';
}

const char *log_quoted(const char *s, char *buf, size_t n)
{
    log_quote(s ? s : "", buf, n);
    return buf;
}
