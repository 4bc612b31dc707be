/* kafka_mock: librdkafka's mock cluster with the service's topics, in-process (serve with
 * KAFKA_BROKERS empty) or standalone (`ticketd kafka-mock`). The cluster runs on
 * librdkafka's threads; nothing here touches the loop. */
/* rdkafka_mock.h (included by kafka_mock.h) needs rdkafka.h first. */
#include <librdkafka/rdkafka.h>

#include "kafka_mock.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kafka_mock_cmd.h"
#include "kafka_common.h"
#include "limits.h"
#include "log.h"

#define MOCK_BROKERS 3

struct kafka_mock {
    rd_kafka_t *rk; /* dummy producer that owns the cluster */
    rd_kafka_mock_cluster_t *cluster;
    char *bootstraps;
    int brokers;
};

int kafka_mock_start(struct kafka_mock **out, int brokers, const char *const *topics,
                     int ntopics, int partitions)
{
    char errstr[512];
    struct kafka_mock *m = calloc(1, sizeof *m);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();

    if (!m) goto fail;
    kafka_conf_log_to_ours(conf);
    m->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    conf = NULL; /* owned by rk on success; destroyed below on failure */
    if (!m->rk) {
        char quoted[600];
        log_quote(errstr, quoted, sizeof quoted);
        log_error("kafka_mock", "event=start_failed err=%s", quoted);
        goto fail;
    }
    m->cluster = rd_kafka_mock_cluster_new(m->rk, brokers);
    if (!m->cluster) {
        log_error("kafka_mock", "event=start_failed err=\"cluster not created\"");
        goto fail;
    }
    m->brokers = brokers;
    for (int i = 0; i < ntopics; i++) {
        rd_kafka_resp_err_t err =
            rd_kafka_mock_topic_create(m->cluster, topics[i], partitions, 1);
        if (err) {
            log_error("kafka_mock", "event=topic_create_failed topic=%s err=\"%s\"", topics[i],
                      rd_kafka_err2str(err));
            goto fail;
        }
    }
    m->bootstraps = strdup(rd_kafka_mock_cluster_bootstraps(m->cluster));
    if (!m->bootstraps) goto fail;
    *out = m;
    return 0;

fail:
    if (conf) rd_kafka_conf_destroy(conf);
    if (m) {
        if (m->cluster) rd_kafka_mock_cluster_destroy(m->cluster);
        if (m->rk) rd_kafka_destroy(m->rk);
        free(m->bootstraps);
        free(m);
    }
    return -1;
}

const char *kafka_mock_bootstraps(const struct kafka_mock *m)
{
    return m->bootstraps;
}

rd_kafka_mock_cluster_t *kafka_mock_cluster(struct kafka_mock *m)
{
    return m->cluster;
}

int kafka_mock_broker_count(const struct kafka_mock *m)
{
    return m->brokers;
}

void kafka_mock_stop(struct kafka_mock *m)
{
    if (!m) return;
    rd_kafka_mock_cluster_destroy(m->cluster);
    rd_kafka_destroy(m->rk);
    free(m->bootstraps);
    free(m);
}

int kafka_mock_start_dev(struct kafka_mock **out, const struct cfg *c)
{
    const char *topics[] = {c->topic, c->dlq_topic};
    if (kafka_mock_start(out, MOCK_BROKERS, topics, 2, c->kafka_partitions) != 0) return -1;
    log_warn("kafka_mock",
             "event=embedded_kafka msg=\"KAFKA_BROKERS is empty: using an in-process mock "
             "Kafka cluster, for DEVELOPMENT ONLY; its data is lost at exit\" bootstrap=%s "
             "partitions=%d",
             kafka_mock_bootstraps(*out), c->kafka_partitions);
    return 0;
}

/* --- `ticketd kafka-mock` ------------------------------------------------------------ */

static void set_brokers(struct kafka_mock *m, int id, int up)
{
    for (int b = 1; b <= m->brokers; b++) {
        if (id && b != id) continue;
        if (up)
            rd_kafka_mock_broker_set_up(m->cluster, b);
        else
            rd_kafka_mock_broker_set_down(m->cluster, b);
    }
}

/* Runs one command line; writes the answer into reply. */
static void run_command(struct kafka_mock *m, char *line, char *reply, size_t replylen)
{
    char verb[32] = "";
    long a = 0, b = 0;
    int n = sscanf(line, "%31s %ld %ld", verb, &a, &b);

    if (n < 1) {
        snprintf(reply, replylen, "error empty command");
        return;
    }
    if (strcmp(verb, "down") == 0 || strcmp(verb, "up") == 0) {
        int up = verb[0] == 'u';
        if (n >= 2 && (a < 1 || a > m->brokers)) {
            snprintf(reply, replylen, "error broker id must be 1..%d", m->brokers);
            return;
        }
        set_brokers(m, n >= 2 ? (int)a : 0, up);
        if (n >= 2)
            log_info("kafka_mock", "event=%s broker=%ld", up ? "broker_up" : "broker_down", a);
        else
            log_info("kafka_mock", "event=%s broker=all", up ? "broker_up" : "broker_down");
        snprintf(reply, replylen, "ok");
    } else if (strcmp(verb, "produce-errors") == 0 && n == 3 && a > 0 && a <= 1000000) {
        rd_kafka_resp_err_t *errs = malloc((size_t)a * sizeof *errs);
        if (!errs) {
            snprintf(reply, replylen, "error out of memory");
            return;
        }
        for (long i = 0; i < a; i++) errs[i] = (rd_kafka_resp_err_t)b;
        rd_kafka_mock_push_request_errors_array(m->cluster, 0 /* Produce */, (size_t)a, errs);
        free(errs);
        log_info("kafka_mock", "event=produce_errors count=%ld err=\"%s\"", a,
                 rd_kafka_err2str((rd_kafka_resp_err_t)b));
        snprintf(reply, replylen, "ok");
    } else if (strcmp(verb, "clear-errors") == 0) {
        rd_kafka_mock_clear_request_errors(m->cluster, 0 /* Produce */);
        log_info("kafka_mock", "event=errors_cleared");
        snprintf(reply, replylen, "ok");
    } else {
        snprintf(reply, replylen, "error unknown command");
    }
}

static void write_line(const char *s)
{
    fputs(s, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

/* EOF on a pipe or terminal means whoever drives us is gone; EOF on /dev/null or a file
 * (a detached run) just means there are no commands. */
static int stdin_eof_means_exit(void)
{
    struct stat st;
    if (isatty(STDIN_FILENO)) return 1;
    if (fstat(STDIN_FILENO, &st) != 0) return 1;
    return S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode);
}

int kafka_mock_main(struct cfg *c, int argc, char **argv)
{
    struct kafka_mock *m = NULL;
    sigset_t mask;
    int sfd = -1, rc = 1;
    char buf[MOCK_CMD_LINE_MAX];
    size_t used = 0;
    int stdin_open = 1;
    int discarding = 0; /* inside an overlong line: skip to its end */

    if (argc > 0 && argv[0] && strcmp(argv[0], "--help") == 0) {
        printf("usage: ticketd kafka-mock\n");
        return 0;
    }
    /* Block the signals before librdkafka starts its threads so that they inherit the mask
     * and the signals arrive only through the signalfd. */
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0) return 1;
    signal(SIGPIPE, SIG_IGN);
    sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0) {
        log_error("kafka_mock", "event=signalfd_failed err=\"%s\"", strerror(errno));
        return 1;
    }

    const char *topics[] = {c->topic, c->dlq_topic};
    if (kafka_mock_start(&m, MOCK_BROKERS, topics, 2, c->kafka_partitions) != 0) goto out;
    printf("bootstrap=%s\n", kafka_mock_bootstraps(m));
    fflush(stdout);
    log_info("kafka_mock", "event=started bootstrap=%s brokers=%d partitions=%d topics=%s,%s",
             kafka_mock_bootstraps(m), MOCK_BROKERS, c->kafka_partitions, c->topic,
             c->dlq_topic);

    for (;;) {
        struct pollfd pfd[2] = {{.fd = sfd, .events = POLLIN},
                                {.fd = stdin_open ? STDIN_FILENO : -1, .events = POLLIN}};
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) continue;
            log_error("kafka_mock", "event=poll_failed err=\"%s\"", strerror(errno));
            goto out;
        }
        if (pfd[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si)
                log_info("kafka_mock", "event=stopping signal=%u", si.ssi_signo);
            rc = 0;
            goto out;
        }
        if (!(pfd[1].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        ssize_t n = read(STDIN_FILENO, buf + used, sizeof buf - 1 - used);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            n = 0;
        }
        if (n == 0) {
            if (stdin_eof_means_exit()) {
                log_info("kafka_mock", "event=stopping reason=stdin_closed");
                rc = 0;
                goto out;
            }
            stdin_open = 0;
            continue;
        }
        used += (size_t)n;
        buf[used] = '\0';
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = '\0';
            if (nl > line && nl[-1] == '\r') nl[-1] = '\0';
            if (discarding) {
                discarding = 0;
            } else if (*line) {
                char reply[128];
                run_command(m, line, reply, sizeof reply);
                write_line(reply);
            }
            line = nl + 1;
        }
        used = strlen(line);
        memmove(buf, line, used);
        if (used == sizeof buf - 1) { /* an overlong line: drop it */
            if (!discarding) write_line("error line too long");
            discarding = 1;
            used = 0;
        }
    }

out:
    kafka_mock_stop(m);
    if (sfd >= 0) close(sfd);
    return rc;
}
