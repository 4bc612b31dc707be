/* test_ingest_sql: db_pool, group commit and migrations against a real PostgreSQL.
 *
 * Needs TICKETD_TEST_DATABASE_URL (a database it may create tables in); without it the test
 * exits 77 (skipped). Every check reads back what was written, through a separate blocking
 * libpq connection. Rows are keyed by a per-run event_id prefix, so earlier runs in the same
 * database do not disturb the counts. Bounded by alarm(). */
#include <errno.h>
#include <json-c/json.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "check.h"
#include "db_pool.h"
#include "ingest.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"

static const char *db_url;
static PGconn *pg;          /* blocking connection for assertions */
static char run_id[32];     /* event_id prefix unique to this run */
static uv_loop_t *loop;
static char pool_name[32];  /* unique per run: sessions show up as application_name ticketd-<it> */
static char app_name[48];

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("Bail out! ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    exit(1);
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "Bail out! test_ingest_sql timed out\n";
    if (write(1, msg, sizeof msg - 1) < 0) _exit(2);
    _exit(1);
}

/* ---- blocking helpers ---- */

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static PGresult *sqlq(const char *sql, int n, const char *const *params)
{
    PGresult *r = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
        die("query failed: %s: %s", sql, PQerrorMessage(pg));
    return r;
}

static long long sql_count(const char *sql, const char *param)
{
    const char *params[1] = {param};
    PGresult *r = sqlq(sql, param ? 1 : 0, params);
    long long v = PQntuples(r) ? atoll(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    return v;
}

/* ---- loop helpers ---- */

static bool timed_out;
static void on_deadline(uv_timer_t *t)
{
    (void)t;
    timed_out = true;
}

static bool run_until(bool (*cond)(void *), void *ud, int timeout_ms)
{
    uv_timer_t t;
    timed_out = false;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, on_deadline, (uint64_t)timeout_ms, 0);
    while (!cond(ud) && !timed_out) uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return cond(ud);
}

/* Both connections of the test pool up and idle. */
static bool pool_full(void *ud)
{
    struct dbp *p = ud;
    return dbp_connected(p) == 2 && dbp_idle(p) == 2;
}

struct counter {
    int n, want;
};
static bool counter_done(void *ud)
{
    struct counter *c = ud;
    return c->n >= c->want;
}

/* ---- ingest results ---- */

struct got {
    int calls;
    struct ingest_result r;
    struct counter *all;
};

static void on_done(void *ud, const struct ingest_result *res)
{
    struct got *g = ud;
    g->calls++;
    g->r = *res;
    if (g->all) g->all->n++;
}

/* Copies src into dst[cap], cut to fit (memcpy: snprintf here warns at -O2 under
 * -Wformat-truncation, the Release build of issue 12). */
static void copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static void make_app(struct application_in *a, const char *event_id, const char *phone,
                     const char *name, const char *email, int seats)
{
    memset(a, 0, sizeof *a);
    copy_text(a->event_id, sizeof a->event_id, event_id);
    copy_text(a->phone, sizeof a->phone, phone);
    copy_text(a->name, sizeof a->name, name);
    copy_text(a->email, sizeof a->email, email ? email : "");
    a->seats = seats;
}

static void event_name(char *out, size_t len, const char *suffix)
{
    snprintf(out, len, "%s-%s", run_id, suffix);
}

/* Metrics: the value of a line "name value" in the rendered text. */
static double metric_value(const char *name)
{
    char *text = metrics_render(NULL);
    double v = 0;
    size_t nlen = strlen(name);
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, name, nlen) == 0 && line[nlen] == ' ') v = atof(line + nlen + 1);
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    return v;
}

/* ---- notifications ---- */

static int notifies;
static bool listening;
static void on_notify(void *ud, const char *channel, const char *payload)
{
    (void)ud;
    (void)payload;
    if (strcmp(channel, "outbox") == 0) notifies++;
}
static void on_listen(void *ud, const PGresult *res, const char *error)
{
    (void)ud;
    (void)error;
    listening = res && PQresultStatus(res) == PGRES_COMMAND_OK;
}
static void on_listener_connect(void *ud, struct dbp *p)
{
    (void)ud;
    if (dbp_query(p, "LISTEN outbox", 0, NULL, on_listen, NULL) != 0) listening = false;
}
static bool is_listening(void *ud)
{
    (void)ud;
    return listening;
}
static bool notified(void *ud)
{
    return notifies > *(int *)ud;
}

/* ---- tests ---- */

static void test_migrate(void)
{
    char err[512];
    int rc = migrate_run(db_url, 10000, err, sizeof err);
    CHECK(rc == 0, "migrate_run applies the schema (%s)", err);
    rc = migrate_run(db_url, 10000, err, sizeof err);
    CHECK(rc == 0, "migrate_run a second time succeeds (%s)", err);
    CHECK(sql_count("SELECT count(*) FROM schema_migrations WHERE version = 1", NULL) == 1,
          "version 1 recorded exactly once");
    CHECK(migrate_latest_version() >= 1, "latest version known");
    CHECK(sql_count("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND"
                    " tablename IN ('schema_migrations','applications','outbox','processed_events',"
                    "'points_ledger','event_effects','dead_letters')",
                    NULL) == 7,
          "all version-1 tables exist");

    /* Two processes migrating a fresh database at once. */
    char dbname[64];
    snprintf(dbname, sizeof dbname, "ticketd_migtest_%d", (int)getpid());
    char sql[160];
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", dbname);
    PQclear(sqlq(sql, 0, NULL));
    char conninfo[1024];
    snprintf(conninfo, sizeof conninfo, "host='%s' port='%s' user='%s' dbname='%s'",
             PQhost(pg), PQport(pg), PQuser(pg), dbname);
    pid_t kids[2];
    for (int i = 0; i < 2; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            char e[512];
            _exit(migrate_run(conninfo, 10000, e, sizeof e) == 0 ? 0 : 1);
        }
    }
    int ok = 0;
    for (int i = 0; i < 2; i++) {
        int status = 0;
        if (waitpid(kids[i], &status, 0) == kids[i] && WIFEXITED(status) &&
            WEXITSTATUS(status) == 0)
            ok++;
    }
    CHECK(ok == 2, "two concurrent migrate_run on a fresh database both succeed");
    PGconn *fresh = PQconnectdb(conninfo);
    PGresult *r = PQexec(fresh, "SELECT count(*), min(version) FROM schema_migrations");
    CHECK(PQresultStatus(r) == PGRES_TUPLES_OK && atoi(PQgetvalue(r, 0, 0)) == migrate_latest_version(),
          "fresh database has one schema_migrations row per version");
    PQclear(r);
    PQfinish(fresh);
    snprintf(sql, sizeof sql, "DROP DATABASE %s", dbname);
    PQclear(sqlq(sql, 0, NULL));

    rc = migrate_run("host=/nonexistent-ticketd-dir port=1 dbname=x password=hunter2", 600, err,
                     sizeof err);
    CHECK(rc == -ETIMEDOUT && strstr(err, "could not connect") && !strstr(err, "hunter2"),
          "unreachable database: clear error without the password (%s)", err);
}

static const char *const tricky_names[] = {
    "Kim \"The Quote\" Lee", "back\\slash", "comma, separated", "{braces}", "}{", "NULL", "null",
    " leading and trailing ", "홍길동", "emoji 🎫🎶", "'single'", "\\\"", "a\\,b\"c{d}e", "tab\tinside? no: plain",
};

static void test_distinct_batch(struct dbp *pool)
{
    enum { N = 1000 };
    struct ingest *ing;
    struct ingest_opts o = {.batch_max = 1000, .queue_max = 5000};
    CHECK(ingest_create(&ing, loop, pool, &o) == 0, "ingest_create");
    char ev[64];
    event_name(ev, sizeof ev, "distinct");
    static struct got got[N];
    static struct application_in apps[N];
    struct counter all = {0, N};
    double count0 = metric_value("ticketd_group_commit_batch_size_count");
    double sum0 = metric_value("ticketd_group_commit_batch_size_sum");
    int notifies0 = notifies;
    for (int i = 0; i < N; i++) {
        char phone[24], name[128], email[64];
        snprintf(phone, sizeof phone, "010%08d", i);
        const char *tn = tricky_names[i % (sizeof tricky_names / sizeof tricky_names[0])];
        snprintf(name, sizeof name, "%s #%d", strcmp(tn, "tab\tinside? no: plain") ? tn : "plain", i);
        snprintf(email, sizeof email, "user%d@example.com", i);
        make_app(&apps[i], ev, phone, name, i % 3 ? email : NULL, 1 + i % 4);
        got[i] = (struct got){.all = &all};
        char key[64];
        snprintf(key, sizeof key, "%s-key-%d", run_id, i);
        ingest_submit(ing, &apps[i], i % 2 ? key : NULL, on_done, &got[i]);
    }
    CHECK(all.n == 0, "no result before the loop runs");
    CHECK(ingest_pending(ing) == N, "all pending");
    run_until(counter_done, &all, 20000);
    int created = 0, once = 0;
    for (int i = 0; i < N; i++) {
        if (got[i].calls == 1) once++;
        if (got[i].r.status == INGEST_CREATED && got[i].r.id > 0 && got[i].r.created_at[0] &&
            strlen(got[i].r.reference) == 36 && got[i].r.reference[14] == '4')
            created++;
    }
    CHECK(once == N, "every submission answered exactly once (%d)", once);
    CHECK(created == N, "1000 distinct applications all CREATED (%d)", created);
    CHECK(metric_value("ticketd_group_commit_batch_size_sum") - sum0 == N, "batch sizes sum to 1000");
    double batches = metric_value("ticketd_group_commit_batch_size_count") - count0;
    CHECK(batches >= 1 && batches < N, "grouped into fewer statements than applications (%g)", batches);
    CHECK(sql_count("SELECT count(*) FROM applications WHERE event_id = $1", ev) == N,
          "exactly 1000 application rows");
    CHECK(sql_count("SELECT count(*) FROM outbox o JOIN applications a ON a.id = o.aggregate_id"
                    " WHERE a.event_id = $1 AND o.event_type = 'TicketApplied'", ev) == N,
          "exactly 1000 outbox rows");
    CHECK(sql_count("SELECT count(DISTINCT o.aggregate_id) FROM outbox o JOIN applications a"
                    " ON a.id = o.aggregate_id WHERE a.event_id = $1", ev) == N,
          "one outbox row per application");

    /* Read back every row and payload and compare with what was submitted. */
    const char *params[1] = {ev};
    PGresult *r = sqlq("SELECT a.id, a.phone, a.name, a.email, a.seats, a.idempotency_key,"
                       " o.payload::text, a.reference::text FROM applications a"
                       " JOIN outbox o ON o.aggregate_id = a.id WHERE a.event_id = $1", 1, params);
    int rows_ok = 0, payload_ok = 0;
    for (int row = 0; row < PQntuples(r); row++) {
        long long id = atoll(PQgetvalue(r, row, 0));
        int i = atoi(PQgetvalue(r, row, 1) + 3);
        if (i < 0 || i >= N || got[i].r.id != id) continue;
        const struct application_in *a = &apps[i];
        bool email_ok = a->email[0] ? !PQgetisnull(r, row, 3) && strcmp(PQgetvalue(r, row, 3), a->email) == 0
                                    : PQgetisnull(r, row, 3);
        char key[64];
        snprintf(key, sizeof key, "%s-key-%d", run_id, i);
        bool key_ok = i % 2 ? strcmp(PQgetvalue(r, row, 5), key) == 0 : PQgetisnull(r, row, 5);
        if (strcmp(PQgetvalue(r, row, 2), a->name) == 0 && email_ok && key_ok &&
            strcmp(PQgetvalue(r, row, 7), got[i].r.reference) == 0 &&
            atoi(PQgetvalue(r, row, 4)) == a->seats)
            rows_ok++;
        json_object *j = json_tokener_parse(PQgetvalue(r, row, 6));
        json_object *v;
        bool ok = j != NULL;
        ok = ok && json_object_object_get_ex(j, "id", &v) && json_object_get_int64(v) == id;
        ok = ok && json_object_object_get_ex(j, "event_id", &v) && strcmp(json_object_get_string(v), ev) == 0;
        ok = ok && json_object_object_get_ex(j, "phone", &v) && strcmp(json_object_get_string(v), a->phone) == 0;
        ok = ok && json_object_object_get_ex(j, "name", &v) && strcmp(json_object_get_string(v), a->name) == 0;
        ok = ok && json_object_object_get_ex(j, "email", &v) &&
             (a->email[0] ? strcmp(json_object_get_string(v), a->email) == 0 : json_object_is_type(v, json_type_null));
        ok = ok && json_object_object_get_ex(j, "seats", &v) && json_object_get_int(v) == a->seats;
        ok = ok && json_object_object_get_ex(j, "created_at", &v) &&
             strcmp(json_object_get_string(v), got[i].r.created_at) == 0;
        ok = ok && json_object_object_length(j) == 7;
        if (ok) payload_ok++;
        json_object_put(j);
    }
    PQclear(r);
    CHECK(rows_ok == N, "every row holds exactly what was submitted, under the id and reference returned (%d)", rows_ok);
    CHECK(payload_ok == N, "every outbox payload matches its application (%d)", payload_ok);
    const char *sample = got[0].r.created_at;
    CHECK(strlen(sample) == 27 && sample[4] == '-' && sample[10] == 'T' && sample[19] == '.' &&
              sample[26] == 'Z',
          "created_at is RFC 3339 UTC with microseconds (%s)", sample);
    CHECK(run_until(notified, &notifies0, 5000), "NOTIFY outbox received after the commit");
    ingest_close(ing);
    uv_run(loop, UV_RUN_NOWAIT);
}

static void submit_dups(struct ingest *ing, const char *ev, int n, struct got *got,
                        struct counter *all)
{
    for (int i = 0; i < n; i++) {
        struct application_in a;
        make_app(&a, ev, "01099998888", "Dup Licate", NULL, 2);
        got[i] = (struct got){.all = all};
        ingest_submit(ing, &a, NULL, on_done, &got[i]);
    }
}

/* first_wins: all in one batch, where the first in arrival order must be the one created
 * (across batches on two connections, which statement commits first is up to the server). */
static void check_dups(const char *what, const char *ev, struct got *got, int n, bool first_wins)
{
    int created = 0, dup = 0, same = 0;
    for (int i = 0; i < n; i++) {
        if (got[i].r.status == INGEST_CREATED) created++;
        if (got[i].r.status == INGEST_DUPLICATE) dup++;
        if (got[i].calls == 1 && got[i].r.id == got[0].r.id && got[i].r.id > 0 &&
            got[i].r.created_at[0])
            same++;
    }
    CHECK(created == 1 && dup == n - 1 && same == n,
          "%s: 1 CREATED, %d DUPLICATE, all with the same id (created=%d dup=%d same=%d)", what,
          n - 1, created, dup, same);
    if (first_wins)
        CHECK(got[0].r.status == INGEST_CREATED, "%s: the first in arrival order is created", what);
    CHECK(sql_count("SELECT count(*) FROM applications WHERE event_id = $1", ev) == 1,
          "%s: one application row", what);
    CHECK(sql_count("SELECT count(*) FROM outbox o JOIN applications a ON a.id = o.aggregate_id"
                    " WHERE a.event_id = $1", ev) == 1,
          "%s: one outbox row", what);
}

static void test_duplicates(struct dbp *pool)
{
    enum { N = 50 };
    struct got got[N];
    char ev[64];

    struct ingest *one;
    struct ingest_opts o1 = {.batch_max = 100, .queue_max = 1000};
    CHECK(ingest_create(&one, loop, pool, &o1) == 0, "ingest_create (batch 100)");
    event_name(ev, sizeof ev, "dup-one-batch");
    struct counter all = {0, N};
    double count0 = metric_value("ticketd_group_commit_batch_size_count");
    submit_dups(one, ev, N, got, &all);
    run_until(counter_done, &all, 10000);
    CHECK(metric_value("ticketd_group_commit_batch_size_count") - count0 == 1, "50 duplicates: one statement");
    check_dups("duplicates in one batch", ev, got, N, true);
    ingest_close(one);

    struct ingest *small;
    struct ingest_opts o2 = {.batch_max = 7, .queue_max = 1000};
    CHECK(ingest_create(&small, loop, pool, &o2) == 0, "ingest_create (batch 7)");
    event_name(ev, sizeof ev, "dup-across");
    all = (struct counter){0, N};
    count0 = metric_value("ticketd_group_commit_batch_size_count");
    submit_dups(small, ev, N, got, &all);
    run_until(counter_done, &all, 10000);
    CHECK(metric_value("ticketd_group_commit_batch_size_count") - count0 >= 8, "50 duplicates: >= 8 statements");
    check_dups("duplicates across batches", ev, got, N, false);
    ingest_close(small);
    uv_run(loop, UV_RUN_NOWAIT);
}

static void submit1(struct ingest *ing, const char *ev, const char *phone, const char *key,
                    struct got *g, struct counter *all)
{
    struct application_in a;
    make_app(&a, ev, phone, "Idem Potent", "i@example.com", 1);
    *g = (struct got){.all = all};
    ingest_submit(ing, &a, key, on_done, g);
}

static void test_idempotency(struct dbp *pool)
{
    struct ingest *ing;
    struct ingest_opts o = {.batch_max = 100, .queue_max = 1000};
    CHECK(ingest_create(&ing, loop, pool, &o) == 0, "ingest_create");
    char ev[64];
    event_name(ev, sizeof ev, "idem");
    char key[96];
    snprintf(key, sizeof key, "k,{\"NULL\"}\\ 키 %s", run_id);
    struct got a, b, c, d, e;
    struct counter all = {0, 1};
    submit1(ing, ev, "01011112222", key, &a, &all);
    run_until(counter_done, &all, 5000);
    CHECK(a.r.status == INGEST_CREATED, "first submission CREATED");
    all = (struct counter){0, 3};
    submit1(ing, ev, "01011112222", key, &b, &all);
    submit1(ing, ev, "01011112222", "another-key", &c, &all);
    submit1(ing, ev, "01011112222", NULL, &d, &all);
    run_until(counter_done, &all, 5000);
    CHECK(b.r.status == INGEST_REPLAYED && b.r.id == a.r.id &&
              strcmp(b.r.created_at, a.r.created_at) == 0 &&
              strcmp(b.r.reference, a.r.reference) == 0,
          "same Idempotency-Key: REPLAYED with the original id, reference and created_at");
    CHECK(c.r.status == INGEST_DUPLICATE && c.r.id == a.r.id && !c.r.reference[0],
          "other key: DUPLICATE, no reference");
    CHECK(d.r.status == INGEST_DUPLICATE && d.r.id == a.r.id && !d.r.reference[0],
          "no key: DUPLICATE, no reference");
    /* issue 12: the same key with another body (another phone; the same phone, another name)
     * is refused and writes nothing */
    all = (struct counter){0, 1};
    submit1(ing, ev, "01011119999", key, &e, &all);
    run_until(counter_done, &all, 5000);
    all = (struct counter){0, 1};
    struct application_in renamed;
    make_app(&renamed, ev, "01011112222", "Someone Else", "i@example.com", 1);
    struct got f = {.all = &all};
    ingest_submit(ing, &renamed, key, on_done, &f);
    run_until(counter_done, &all, 5000);
    CHECK(e.r.status == INGEST_KEY_MISMATCH && !e.r.reference[0],
          "same key, another phone: KEY_MISMATCH (status %d)", e.r.status);
    CHECK(f.r.status == INGEST_KEY_MISMATCH && !f.r.reference[0],
          "same key, same phone, another name: KEY_MISMATCH (status %d)", f.r.status);
    CHECK(sql_count("SELECT count(*) FROM applications WHERE event_id = $1", ev) == 1,
          "still one row for the event");
    const char *params[1] = {ev};
    PGresult *r = sqlq("SELECT idempotency_key FROM applications WHERE event_id = $1", 1, params);
    CHECK(PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), key) == 0, "key stored byte for byte");
    PQclear(r);

    /* Retries landing in the same batch as the original. */
    event_name(ev, sizeof ev, "idem-batch");
    all = (struct counter){0, 3};
    char kk[64], zz[64];
    snprintf(kk, sizeof kk, "%s-kk", run_id);
    snprintf(zz, sizeof zz, "%s-zz", run_id);
    submit1(ing, ev, "01033334444", kk, &a, &all);
    submit1(ing, ev, "01033334444", kk, &b, &all);
    CHECK(b.calls == 1 && b.r.status == INGEST_KEY_IN_FLIGHT,
          "the same key while the first is queued: KEY_IN_FLIGHT at once (status %d)", b.r.status);
    submit1(ing, ev, "01033334444", zz, &c, &all);
    run_until(counter_done, &all, 5000);
    CHECK(a.r.status == INGEST_CREATED && c.r.status == INGEST_DUPLICATE && c.r.id == a.r.id,
          "in one batch: CREATED, then DUPLICATE for another key");
    all = (struct counter){0, 1};
    submit1(ing, ev, "01033334444", kk, &b, &all);
    run_until(counter_done, &all, 5000);
    CHECK(b.r.status == INGEST_REPLAYED && strcmp(b.r.reference, a.r.reference) == 0,
          "the same key once answered: REPLAYED (status %d)", b.r.status);
    CHECK(sql_count("SELECT count(*) FROM outbox o JOIN applications a ON a.id = o.aggregate_id"
                    " WHERE a.event_id = $1", ev) == 1,
          "one outbox row");
    ingest_close(ing);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* A row committed by another transaction after the batch's snapshot: ON CONFLICT skips it,
 * the snapshot cannot see it, so ingest must look it up before answering. */
static PGconn *watcher;
static bool committed;
static void on_watch(uv_timer_t *t)
{
    const char *params[1] = {app_name};
    PGresult *r = PQexecParams(watcher, "SELECT count(*) FROM pg_stat_activity WHERE"
                               " wait_event_type = 'Lock' AND application_name = $1",
                               1, NULL, params, NULL, NULL, 0);
    bool waiting = PQresultStatus(r) == PGRES_TUPLES_OK && atoi(PQgetvalue(r, 0, 0)) > 0;
    PQclear(r);
    if (waiting) {
        PQclear(sqlq("COMMIT", 0, NULL));
        committed = true;
        uv_timer_stop(t);
    }
}

static void test_concurrent_commit(struct dbp *pool)
{
    struct ingest *ing;
    struct ingest_opts o = {.batch_max = 100, .queue_max = 1000};
    CHECK(ingest_create(&ing, loop, pool, &o) == 0, "ingest_create");
    char ev[64];
    event_name(ev, sizeof ev, "race");
    watcher = PQconnectdb(db_url);
    if (PQstatus(watcher) != CONNECTION_OK) die("watcher: %s", PQerrorMessage(watcher));
    PQclear(sqlq("BEGIN", 0, NULL));
    /* The other transaction stores the fingerprint computed in SQL the way migration 3 does:
     * the replay below also checks that it equals validate_fingerprint's. */
    char rk[64];
    snprintf(rk, sizeof rk, "%s-rk", run_id);
    const char *iparams[2] = {ev, rk};
    PGresult *r = sqlq("INSERT INTO applications (event_id, phone, name, email, idempotency_key,"
                       " idempotency_fingerprint) SELECT $1, '01055556666', 'Idem Potent',"
                       " 'i@example.com', $2, sha256(convert_to($1, 'UTF8') || '\\x00'::bytea"
                       " || convert_to('01055556666', 'UTF8') || '\\x00'::bytea"
                       " || convert_to('Idem Potent', 'UTF8') || '\\x00'::bytea"
                       " || convert_to('i@example.com', 'UTF8') || '\\x00'::bytea"
                       " || convert_to('1', 'UTF8')) RETURNING id", 2, iparams);
    long long other_id = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);

    double lookups0 = metric_value("ticketd_group_commit_lookups_total");
    struct got a, b, c;
    struct counter all = {0, 3};
    submit1(ing, ev, "01055556666", rk, &a, &all);
    submit1(ing, ev, "01055556666", NULL, &b, &all);
    submit1(ing, ev, "01077778888", NULL, &c, &all);
    uv_timer_t t;
    committed = false;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, on_watch, 20, 20);
    run_until(counter_done, &all, 15000);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    if (!committed) PQclear(sqlq("ROLLBACK", 0, NULL));
    PQfinish(watcher);
    CHECK(committed, "the batch waited on the uncommitted row");
    CHECK(a.r.status == INGEST_REPLAYED && a.r.id == other_id,
          "same key as the concurrent row: REPLAYED with its id (status %d)", a.r.status);
    CHECK(b.r.status == INGEST_DUPLICATE && b.r.id == other_id,
          "no key: DUPLICATE with the concurrent row's id (status %d)", b.r.status);
    CHECK(c.r.status == INGEST_CREATED, "the other application in the batch CREATED");
    CHECK(metric_value("ticketd_group_commit_lookups_total") - lookups0 == 1,
          "the conflicting key was looked up again");
    CHECK(sql_count("SELECT count(*) FROM applications WHERE event_id = $1", ev) == 2, "two rows");
    ingest_close(ing);
    uv_run(loop, UV_RUN_NOWAIT);
}

static bool key_cleared(void *ud)
{
    return sql_count("SELECT count(*) FROM applications WHERE idempotency_key = $1", ud) == 0;
}

/* Keys older than the TTL are cleared in the background; then the key is free again. */
static void test_key_expiry(struct dbp *pool)
{
    struct ingest *ing;
    struct ingest_opts o = {.batch_max = 100, .queue_max = 1000, .key_ttl_ms = 300};
    CHECK(ingest_create(&ing, loop, pool, &o) == 0, "ingest_create (key TTL 300 ms)");
    char ev[64], key[64];
    event_name(ev, sizeof ev, "expiry");
    snprintf(key, sizeof key, "%s-expiring", run_id);
    struct got a, b;
    struct counter all = {0, 1};
    submit1(ing, ev, "01044445555", key, &a, &all);
    run_until(counter_done, &all, 5000);
    CHECK(a.r.status == INGEST_CREATED, "keyed application CREATED");
    double pruned0 = metric_value("ticketd_idempotency_keys_pruned_total");
    CHECK(run_until(key_cleared, key, 20000), "the key is cleared after its TTL");
    CHECK(metric_value("ticketd_idempotency_keys_pruned_total") > pruned0,
          "ticketd_idempotency_keys_pruned_total rose");
    CHECK(sql_count("SELECT count(*) FROM applications WHERE event_id = $1 AND"
                    " idempotency_fingerprint IS NULL", ev) == 1,
          "its fingerprint is cleared with it, the application stays");
    all = (struct counter){0, 1};
    submit1(ing, ev, "01044446666", key, &b, &all);
    run_until(counter_done, &all, 5000);
    CHECK(b.r.status == INGEST_CREATED, "an expired key is free for a new request (status %d)",
          b.r.status);
    ingest_close(ing);
    uv_run(loop, UV_RUN_NOWAIT);
}

static void test_batch_max_one(struct dbp *pool)
{
    enum { N = 20 };
    struct ingest *ing;
    struct ingest_opts o = {.batch_max = 1, .queue_max = 1000};
    CHECK(ingest_create(&ing, loop, pool, &o) == 0, "ingest_create (batch 1)");
    char ev[64];
    event_name(ev, sizeof ev, "one");
    struct got got[N];
    struct counter all = {0, N};
    double count0 = metric_value("ticketd_group_commit_batch_size_count");
    for (int i = 0; i < N; i++) {
        char phone[24];
        snprintf(phone, sizeof phone, "0107000%04d", i);
        submit1(ing, ev, phone, NULL, &got[i], &all);
    }
    run_until(counter_done, &all, 10000);
    int created = 0;
    for (int i = 0; i < N; i++) created += got[i].r.status == INGEST_CREATED;
    CHECK(created == N, "BATCH_MAX=1: all CREATED");
    CHECK(metric_value("ticketd_group_commit_batch_size_count") - count0 == N, "BATCH_MAX=1: one statement each");
    ingest_close(ing);
    uv_run(loop, UV_RUN_NOWAIT);
}

static void test_overload_and_close(struct dbp *pool)
{
    struct ingest *ing;
    struct ingest_opts o = {.batch_max = 10, .queue_max = 5};
    CHECK(ingest_create(&ing, loop, pool, &o) == 0, "ingest_create (queue 5)");
    char ev[64];
    event_name(ev, sizeof ev, "overload");
    struct got got[6];
    struct counter all = {0, 6};
    for (int i = 0; i < 6; i++) {
        char phone[24];
        snprintf(phone, sizeof phone, "0106000%04d", i);
        submit1(ing, ev, phone, NULL, &got[i], &all);
    }
    CHECK(got[5].calls == 1 && got[5].r.status == INGEST_OVERLOADED, "past queue_max: OVERLOADED at once");
    CHECK(got[0].calls == 0, "the others wait for the loop");
    ingest_close(ing);
    run_until(counter_done, &all, 5000);
    int unavailable = 0;
    for (int i = 0; i < 5; i++) unavailable += got[i].calls == 1 && got[i].r.status == INGEST_UNAVAILABLE;
    CHECK(unavailable == 5, "ingest_close: pending submissions UNAVAILABLE");
    CHECK(sql_count("SELECT count(*) FROM applications WHERE event_id = $1", ev) == 0, "and no rows");
}

/* ---- db_pool ---- */

struct qres {
    int calls;
    bool ok;
    bool null_res;
    char value[256];
    char error[256];
};
static void on_qres(void *ud, const PGresult *res, const char *error)
{
    struct qres *q = ud;
    q->calls++;
    q->null_res = res == NULL;
    q->ok = res && PQresultStatus(res) == PGRES_TUPLES_OK;
    if (q->ok && PQntuples(res) > 0) snprintf(q->value, sizeof q->value, "%s", PQgetvalue(res, 0, 0));
    snprintf(q->error, sizeof q->error, "%s", error ? error : "");
}
static bool qres_done(void *ud)
{
    return ((struct qres *)ud)->calls > 0;
}
static void on_closed(void *ud)
{
    (*(int *)ud)++;
}
static bool flag_set(void *ud)
{
    return *(int *)ud > 0;
}

static void test_pool(struct dbp *pool)
{
    struct qres q = {0};
    const char *params[2] = {"a\"b,{c}\\ 🎫", NULL};
    int rc = dbp_query(pool, "SELECT $1::text || coalesce($2, '-null')", 2, params, on_qres, &q);
    CHECK(rc == 0 && q.calls == 0, "dbp_query queues and never calls back inside");
    run_until(qres_done, &q, 5000);
    CHECK(q.ok && strcmp(q.value, "a\"b,{c}\\ 🎫-null") == 0, "params round-trip (%s)", q.value);

    struct qres e = {0};
    rc = dbp_query(pool, "SELECT 1/0", 0, NULL, on_qres, &e);
    run_until(qres_done, &e, 5000);
    CHECK(rc == 0 && !e.ok && !e.null_res && strstr(e.error, "division by zero"),
          "query error arrives with its result and message");

    /* A connection killed under a running query: res NULL, then the pool reconnects. */
    struct qres s = {0};
    rc = dbp_query(pool, "SELECT pg_sleep(30)", 0, NULL, on_qres, &s);
    uv_sleep(200);
    const char *app[1] = {app_name};
    PQclear(sqlq("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name ="
                 " $1 AND query LIKE 'SELECT pg_sleep%'", 1, app));
    run_until(qres_done, &s, 10000);
    CHECK(rc == 0 && s.null_res && strstr(s.error, "outcome unknown"),
          "killed backend: res NULL, outcome unknown (%s)", s.error);
    CHECK(run_until(pool_full, pool, 10000), "pool reconnected by itself (%d/2)", dbp_connected(pool));
    struct qres after = {0};
    rc = dbp_query(pool, "SELECT 'again'", 0, NULL, on_qres, &after);
    run_until(qres_done, &after, 5000);
    CHECK(rc == 0 && after.ok && strcmp(after.value, "again") == 0, "queries work after reconnect");
}

static void test_unreachable(void)
{
    struct dbp *bad;
    struct dbp_opts o = {.conninfo = "host=/nonexistent-ticketd-dir port=1 dbname=x password=hunter2",
                         .size = 2, .name = "bad", .reconnect_min_ms = 50, .reconnect_max_ms = 200};
    CHECK(dbp_create(&bad, loop, &o) == 0, "dbp_create with an unreachable database");
    uv_run(loop, UV_RUN_NOWAIT);
    CHECK(dbp_connected(bad) == 0, "nothing connected");
    struct qres q = {0};
    CHECK(dbp_query(bad, "SELECT 1", 0, NULL, on_qres, &q) == -ENOTCONN, "dbp_query: -ENOTCONN");
    struct ingest *ing;
    struct ingest_opts io = {.batch_max = 10, .queue_max = 10};
    CHECK(ingest_create(&ing, loop, bad, &io) == 0, "ingest_create on it");
    struct got g;
    struct counter all = {0, 1};
    submit1(ing, "unreachable", "01012345678", NULL, &g, &all);
    run_until(counter_done, &all, 2000);
    CHECK(g.calls == 1 && g.r.status == INGEST_UNAVAILABLE, "submission UNAVAILABLE");
    ingest_close(ing);
    int closed = 0;
    dbp_close(bad, on_closed, &closed);
    CHECK(closed == 0, "dbp_close calls done later");
    run_until(flag_set, &closed, 5000);
    CHECK(closed == 1, "dbp_close done");
}

int main(void)
{
    db_url = getenv("TICKETD_TEST_DATABASE_URL");
    if (!db_url || !*db_url) {
        printf("1..0 # SKIP TICKETD_TEST_DATABASE_URL is not set (needs a PostgreSQL database)\n");
        return 77;
    }
    signal(SIGALRM, on_alarm);
    alarm(55);
    log_set_level(getenv("TICKETD_TEST_LOG") ? getenv("TICKETD_TEST_LOG") : "warn");
    snprintf(run_id, sizeof run_id, "t%d-%ld", (int)getpid(), (long)time(NULL));
    snprintf(pool_name, sizeof pool_name, "ut%d", (int)getpid());
    snprintf(app_name, sizeof app_name, "ticketd-%s", pool_name);
    loop = uv_default_loop();

    pg = PQconnectdb(db_url);
    if (PQstatus(pg) != CONNECTION_OK) die("cannot connect: %s", PQerrorMessage(pg));
    PQsetNoticeProcessor(pg, quiet, NULL);
    test_migrate();
    if (failed) die("migrations failed");

    struct dbp *pool, *listener;
    struct dbp_opts po = {.conninfo = db_url, .size = 2, .name = pool_name};
    struct dbp_opts lo = {.conninfo = db_url, .size = 1, .name = "listen",
                          .on_connect = on_listener_connect, .on_notify = on_notify};
    CHECK(dbp_create(&pool, loop, &po) == 0, "dbp_create");
    CHECK(dbp_create(&listener, loop, &lo) == 0, "dbp_create (listener)");
    CHECK(run_until(pool_full, pool, 10000) && dbp_connected(pool) == 2, "pool connected");
    CHECK(run_until(is_listening, NULL, 10000), "listener LISTENs");

    test_pool(pool);
    test_distinct_batch(pool);
    test_duplicates(pool);
    test_idempotency(pool);
    test_concurrent_commit(pool);
    test_batch_max_one(pool);
    test_overload_and_close(pool);
    test_key_expiry(pool);
    test_unreachable();

    /* Closing with a query running and one queued: both fail with "closing". */
    struct qres running = {0}, queued = {0}, queued2 = {0};
    int rc1 = dbp_query(listener, "SELECT pg_sleep(10)", 0, NULL, on_qres, &running);
    int rc2 = dbp_query(listener, "SELECT 1", 0, NULL, on_qres, &queued);
    int closed = 0;
    dbp_close(listener, on_closed, &closed);
    int rc3 = dbp_query(listener, "SELECT 1", 0, NULL, on_qres, &queued2);
    CHECK(rc1 == 0 && rc2 == 0 && rc3 == -ENOTCONN && running.calls == 0, "close: nothing called back yet");
    run_until(flag_set, &closed, 5000);
    CHECK(closed == 1 && running.calls == 1 && running.null_res && queued.calls == 1 &&
              queued.null_res && strcmp(queued.error, "closing") == 0,
          "close: running and queued queries fail with res NULL, then done");
    closed = 0;
    dbp_close(pool, on_closed, &closed);
    run_until(flag_set, &closed, 5000);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(loop) == 0, "every handle closed");
    PQfinish(pg);
    return CHECK_SUMMARY();
}
