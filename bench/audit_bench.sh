#!/usr/bin/env bash
# Audit bench (issue 5): time and peak memory of `ticketd audit` over N applications.
#
#   bench/audit_bench.sh [N ...]          default: 100000   (e.g. 100000 1000000)
#
# For each N: a throwaway PostgreSQL cluster and a standalone `ticketd kafka-mock`; N
# applications and their outbox rows seeded with one generate_series statement; every
# outbox row produced to the mock by a small librdkafka seeder (built from the C below:
# key, value = payload, CloudEvents headers), each row then marked published at the
# partition/offset of its delivery report; every event recorded as processed with its
# effects done; the consumer group's offsets committed at the high watermarks. Then
# `ticketd audit` runs under /usr/bin/time -v, twice (the second run has warm caches).
# Prints one line per run: N, partitions, wall seconds, peak RSS, verdict line.
# BENCH_COMMAND replaces `audit` with another command over the same data (report_bench.sh).
#
# The mock keeps at most 5 MiB per partition; ~330 bytes per message means 1,000,000
# messages need >= 64 partitions; the script uses one partition per 8,000 applications
# (at least 12, at most 256). Needs: initdb/pg_ctl (PGBIN), psql, cc, pkg-config.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TICKETD_BIN:-$ROOT/build/ticketd}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
SIZES=("$@")
BENCH_COMMAND=${BENCH_COMMAND:-audit}
[ ${#SIZES[@]} -gt 0 ] || SIZES=(100000)
[ -x "$BIN" ] || { echo "audit_bench: $BIN not built (set TICKETD_BIN)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/ticketd-audit-bench.XXXXXX)
chmod 755 "$WORK"
PG_PID_DIR=""
MOCK_PID=""
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    if [ -n "$MOCK_PID" ]; then kill "$MOCK_PID" 2>/dev/null || true; wait "$MOCK_PID" 2>/dev/null || true; fi
    if [ -n "$PG_PID_DIR" ]; then as_pg "$PGBIN/pg_ctl" -D "$PG_PID_DIR" -m immediate -w stop >/dev/null 2>&1 || true; fi
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- the seeder (librdkafka)
cat > "$WORK/seed.c" <<'EOF'
/* Produces every outbox row (COPY ... TO STDOUT) as the relay would, writes
 * "event_id\tpartition\toffset" per delivery report, then commits the group's offsets at
 * the high watermarks with a consumer that never joins the group. */
#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static FILE *acks;
static long failed;

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk, (void)opaque;
    char *ev = m->_private;
    if (m->err) failed++;
    else fprintf(acks, "%s\t%d\t%lld\n", ev, (int)m->partition, (long long)m->offset);
    free(ev);
}

static void set(rd_kafka_conf_t *c, const char *k, const char *v)
{
    char e[256];
    if (rd_kafka_conf_set(c, k, v, e, sizeof e) != RD_KAFKA_CONF_OK) { fprintf(stderr, "%s\n", e); exit(1); }
}

int main(int argc, char **argv)
{
    if (argc != 6) { fprintf(stderr, "usage: seed conninfo brokers topic group acks\n"); return 2; }
    const char *topic = argv[3];
    acks = fopen(argv[5], "w");
    PGconn *db = PQconnectdb(argv[1]);
    if (PQstatus(db) != CONNECTION_OK) { fprintf(stderr, "%s", PQerrorMessage(db)); return 1; }
    PGresult *r = PQexec(db, "COPY (SELECT event_id, aggregate_id, payload::text,"
                             " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
                             " FROM outbox ORDER BY id) TO STDOUT");
    if (PQresultStatus(r) != PGRES_COPY_OUT) { fprintf(stderr, "%s", PQerrorMessage(db)); return 1; }
    PQclear(r);

    char e[512];
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    set(c, "bootstrap.servers", argv[2]);
    set(c, "enable.idempotence", "true");
    set(c, "linger.ms", "5");
    set(c, "batch.num.messages", "10000");
    set(c, "queue.buffering.max.messages", "1000000");
    set(c, "queue.buffering.max.kbytes", "1048576");
    rd_kafka_conf_set_dr_msg_cb(c, on_delivery);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, c, e, sizeof e);
    if (!rk) { fprintf(stderr, "%s\n", e); return 1; }

    long n = 0;
    char *line;
    int len;
    while ((len = PQgetCopyData(db, &line, 0)) > 0) {
        char *f[4] = {line};
        int nf = 1;
        for (char *p = line; *p && nf < 4; p++)
            if (*p == '\t') { *p = '\0'; f[nf++] = p + 1; }
        char *nl = strchr(f[3], '\n');
        if (nl) *nl = '\0';
        char *ev = strdup(f[0]);
        rd_kafka_resp_err_t err;
        do {
            err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic),
                                    RD_KAFKA_V_KEY(f[1], strlen(f[1])),
                                    RD_KAFKA_V_VALUE(f[2], strlen(f[2])),
                                    RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                    RD_KAFKA_V_HEADER("ce_specversion", "1.0", -1),
                                    RD_KAFKA_V_HEADER("ce_id", f[0], -1),
                                    RD_KAFKA_V_HEADER("ce_source", "/ticketd", -1),
                                    RD_KAFKA_V_HEADER("ce_type", "TicketApplied", -1),
                                    RD_KAFKA_V_HEADER("ce_time", f[3], -1),
                                    RD_KAFKA_V_HEADER("content-type", "application/json", -1),
                                    RD_KAFKA_V_OPAQUE(ev), RD_KAFKA_V_END);
            if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) rd_kafka_poll(rk, 10);
        } while (err == RD_KAFKA_RESP_ERR__QUEUE_FULL);
        if (err) { fprintf(stderr, "produce: %s\n", rd_kafka_err2str(err)); return 1; }
        PQfreemem(line);
        if (++n % 10000 == 0) rd_kafka_poll(rk, 0);
    }
    PQclear(PQgetResult(db));
    rd_kafka_flush(rk, 120000);
    fclose(acks);
    if (failed || rd_kafka_outq_len(rk)) { fprintf(stderr, "%ld deliveries failed\n", failed); return 1; }

    /* The group's committed offsets = the high watermarks (everything consumed). */
    rd_kafka_conf_t *cc = rd_kafka_conf_new();
    set(cc, "bootstrap.servers", argv[2]);
    set(cc, "group.id", argv[4]);
    set(cc, "enable.auto.commit", "false");
    rd_kafka_t *cons = rd_kafka_new(RD_KAFKA_CONSUMER, cc, e, sizeof e);
    const struct rd_kafka_metadata *md;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(cons, topic, NULL);
    if (rd_kafka_metadata(cons, 0, rkt, &md, 10000) || md->topic_cnt != 1) { fprintf(stderr, "metadata\n"); return 1; }
    int parts = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(parts);
    for (int p = 0; p < parts; p++) {
        int64_t lo, hi;
        if (rd_kafka_query_watermark_offsets(cons, topic, p, &lo, &hi, 10000)) return 1;
        rd_kafka_topic_partition_list_add(l, topic, p)->offset = hi;
    }
    rd_kafka_resp_err_t ce = rd_kafka_commit(cons, l, 0);
    if (ce) { fprintf(stderr, "commit: %s\n", rd_kafka_err2str(ce)); return 1; }
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_destroy(cons);
    rd_kafka_destroy(rk);
    PQfinish(db);
    printf("produced=%ld partitions=%d\n", n, parts);
    return 0;
}
EOF
# shellcheck disable=SC2046
cc -O2 -std=c11 -D_GNU_SOURCE -o "$WORK/seed" "$WORK/seed.c" $(pkg-config --cflags --libs rdkafka libpq)

# ---------------------------------------------------------------- PostgreSQL
PGDIR="$WORK/pg"
mkdir -p "$PGDIR"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDIR"
PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U postgres -E UTF8 --no-locale >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w -o \
    "-c listen_addresses='' -c unix_socket_directories=$PGDIR -c port=$PGPORT -c shared_buffers=512MB -c max_wal_size=4GB -c synchronous_commit=off" \
    start >/dev/null
PG_PID_DIR="$PGDIR/data"
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h "$PGDIR" -p "$PGPORT" -U postgres "$@"; }
psql_ -d postgres -c "CREATE DATABASE ticketd"
export DATABASE_URL="host=$PGDIR port=$PGPORT user=postgres dbname=ticketd"
"$BIN" migrate >/dev/null 2>&1

for N in "${SIZES[@]}"; do
    PARTS=$(( N / 8000 )); [ "$PARTS" -ge 12 ] || PARTS=12; [ "$PARTS" -le 256 ] || PARTS=256
    GROUP="audit-bench-$N-$$"

    # The mock: stdin held open by fd 3, so it runs until we close it.
    rm -f "$WORK/mock.in"; mkfifo "$WORK/mock.in"
    KAFKA_PARTITIONS=$PARTS LOG_LEVEL=warn "$BIN" kafka-mock <"$WORK/mock.in" >"$WORK/mock.out" 2>"$WORK/mock.log" &
    MOCK_PID=$!
    exec 3>"$WORK/mock.in"
    for _ in $(seq 100); do grep -q '^bootstrap=' "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
    BROKERS=$(sed -n 's/^bootstrap=//p' "$WORK/mock.out")
    [ -n "$BROKERS" ] || { echo "kafka-mock did not start" >&2; cat "$WORK/mock.log" >&2; exit 1; }

    t0=$(date +%s.%N)
    psql_ -d ticketd -c "TRUNCATE applications, outbox, processed_events, points_ledger, event_effects, dead_letters RESTART IDENTITY" \
        -c "INSERT INTO applications (event_id, phone, name, seats, created_at)
            SELECT 'bench-2026', '010' || lpad(g::text, 8, '0'), 'Customer ' || g, 1 + g % 4,
                   now() - interval '1 hour'
              FROM generate_series(1, $N) g" \
        -c "INSERT INTO outbox (aggregate_id, event_type, payload, created_at)
            SELECT id, 'TicketApplied',
                   json_build_object('id', id, 'event_id', event_id, 'phone', phone, 'name', name,
                                     'email', email, 'seats', seats, 'created_at', created_at)::jsonb,
                   created_at
              FROM applications ORDER BY id"
    "$WORK/seed" "$DATABASE_URL" "$BROKERS" ticket-applied "$GROUP" "$WORK/acks.tsv"
    psql_ -d ticketd \
        -c "CREATE UNLOGGED TABLE IF NOT EXISTS bench_acks (event_id uuid, p int, o bigint); TRUNCATE bench_acks" \
        -c "\\copy bench_acks FROM '$WORK/acks.tsv'" \
        -c "UPDATE outbox SET attempts = 1 FROM bench_acks a WHERE outbox.event_id = a.event_id" \
        -c "INSERT INTO outbox_publications (kafka_partition, ids, offsets, first_id, last_id, epoch)
            SELECT a.p, array_agg(o.id ORDER BY o.id), array_agg(a.o ORDER BY o.id), min(o.id),
                   max(o.id), 0 FROM bench_acks a JOIN outbox o USING (event_id) GROUP BY a.p, o.id / 1000" \
        -c "INSERT INTO processed_events (event_id, consumer_group, topic, partition, \"offset\")
            SELECT event_id, '$GROUP', 'ticket-applied', p, o FROM bench_acks" \
        -c "INSERT INTO event_effects (event_id, effect, application_id, done, attempts)
            SELECT event_id, e, aggregate_id, true, 1 FROM outbox, unnest(ARRAY['points','data_platform']) e" \
        -c "DROP TABLE bench_acks" -c "VACUUM ANALYZE"
    t1=$(date +%s.%N)
    printf 'seeded N=%d partitions=%d in %.1f s\n' "$N" "$PARTS" "$(echo "$t1 - $t0" | bc)"

    for run in 1 2; do
        set +e
        # shellcheck disable=SC2086  # $BENCH_COMMAND: the command and its flags, split on purpose
        CONSUMER_GROUP=$GROUP KAFKA_BROKERS=$BROKERS LOG_LEVEL=${AUDIT_LOG_LEVEL:-warn} \
            /usr/bin/time -v "$BIN" $BENCH_COMMAND >"$WORK/audit.out" 2>"$WORK/audit.err"
        rc=$?
        set -e
        wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$WORK/audit.err")
        rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/audit.err")
        cpu_u=$(sed -n 's/.*User time (seconds): //p' "$WORK/audit.err")
        cpu_s=$(sed -n 's/.*System time (seconds): //p' "$WORK/audit.err")
        verified=$(sed -n 's/^ *verified (ce_id found at the recorded offset) *//p' "$WORK/audit.out")
        expired=$(sed -n 's/^ *expired from the topic ([^)]*) *//p' "$WORK/audit.out")
        printf '%s N=%d partitions=%d run=%d exit=%d wall=%s user=%ss sys=%ss peak_rss=%d MiB verified=%s expired=%s | %s\n' \
            "${BENCH_COMMAND%% *}" "$N" "$PARTS" "$run" "$rc" "$wall" "$cpu_u" "$cpu_s" "$(( rss / 1024 ))" "$verified" "$expired" \
            "$(tail -n 1 "$WORK/audit.out")"
        [ "${AUDIT_LOG_LEVEL:-warn}" != debug ] || grep 'mod=audit' "$WORK/audit.err" >&2
        if [ "$rc" -ne 0 ]; then grep -E 'MISSING|expired|error' "$WORK/audit.out" "$WORK/audit.err" | head -20 >&2; fi
    done

    exec 3>&-
    wait "$MOCK_PID" 2>/dev/null || true
    MOCK_PID=""
done
