/* log: logfmt lines on stderr. Each line is formatted into one buffer and written with a
 * single write(2) so lines from the loop and the thread pool never interleave. */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 4096

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

void log_emit(int level, const char *module, const char *fmt, ...)
{
    char line[LOG_LINE_MAX];
    struct timespec ts;
    struct tm tm;

    if (level < LOG_DEBUG) level = LOG_DEBUG;
    if (level > LOG_ERROR) level = LOG_ERROR;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);

    int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ level=%s mod=%s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, (int)(ts.tv_nsec / 1000000), level_names[level],
                     module ? module : "-");
    if (n < 0) return;
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;

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
    write_all(STDERR_FILENO, line, len);
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
