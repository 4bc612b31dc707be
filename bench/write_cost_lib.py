"""The write-cost bench (bench/write-cost): the PostgreSQL work per application, measured
with the same wrk load for ticketd (ingest only, full pipeline, one phase at a time) and the
Node.js peer. See bench/write-cost --help and bench/RESULTS.md.

Reuses bench/rush_lib.py's process helpers (Proc, the throwaway cluster's psql/pids/close,
http helpers); what they lack for this bench lives here: a cluster that also listens on TCP
(the peer needs it) with autovacuum off, counter snapshots (WAL LSN, pg_stat_wal,
pg_stat_user_tables, CPU of every PostgreSQL process including exited backends), the
per-relation WAL split from pg_waldump, wrk, and the peer's scratch copy.
"""
import collections
import os
import re
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import rush_lib as R  # noqa: E402

BenchError = R.BenchError

# The rush bench's cluster settings, plus autovacuum off: a VACUUM landing inside one run
# and not another would make the per-application WAL differ between runs; the bench runs
# its own VACUUM phase instead, so that deferred cost is measured, not dropped.
PG_SETTINGS = dict(R.PG_SETTINGS, autovacuum="off")
PEER_SRC = os.environ.get("PEER_SRC", "/work/shared/peers")


def log(msg):
    print(f"[write-cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the cluster

class Cluster(R.Pg):
    """A throwaway PostgreSQL 15 cluster on a unix socket and 127.0.0.1:<free port>, with
    database `ticketd` (owner postgres) and database `peer` owned by role bench/bench."""

    def __init__(self, workdir):
        # Both systems reach PostgreSQL the same way: TCP on loopback.
        super().__init__(workdir, tcp=True)
        self.rows("CREATE ROLE bench LOGIN PASSWORD 'bench'", "CREATE DATABASE peer OWNER bench",
                  db="postgres")

    def cpu_ticks(self):
        """utime+stime of the postmaster and every live child, plus the postmaster's
        cutime+cstime: the CPU of children it has already reaped (backends of clients that
        disconnected), so the sum only grows."""
        total = 0
        for pid in self.pids():
            st = proc_times(pid)
            if st:
                total += st[0] + (st[1] if pid == self.pid else 0)
        return total

    def wait_no_clients(self, db, keep=(), timeout=30):
        """Until no client backend but ours (keep: pids) is connected to db: a backend flushes
        its table and WAL counters when it exits, so the snapshot after this sees them all."""
        deadline = time.monotonic() + timeout
        others = "".join(f" AND pid <> {int(p)}" for p in keep)
        while time.monotonic() < deadline:
            n = int(self.rows(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' "
                              f"AND backend_type = 'client backend'{others}", db="postgres")[0][0])
            if n == 0:
                return
            time.sleep(0.1)
        raise BenchError(f"client backends of {db} still connected after {timeout} s")


class Session:
    """One long-lived psql session for polling: one backend for the whole wait instead of a
    fork and a backend start-up per poll, and its own CPU is known (pid), so snapshot()
    subtracts it from PostgreSQL's."""

    MARK = "__write_cost_end__"

    def __init__(self, pg, db):
        self.p = subprocess.Popen(["psql", "-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=0",
                                   "-h", pg.dir, "-p", str(pg.port), "-U", "postgres", "-d", db],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  preexec_fn=R.H._die_with_parent)
        self.pid = int(self.query("SELECT pg_backend_pid()")[0][0])

    def query(self, sql):
        self.p.stdin.write(sql.rstrip().rstrip(";") + ";\n\\echo " + self.MARK + "\n")
        self.p.stdin.flush()
        rows = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise BenchError("polling psql session ended")
            line = line.rstrip("\n")
            if line == self.MARK:
                return rows
            if line.startswith(("ERROR", "psql:")):
                raise BenchError(f"poll query failed: {line}")
            if line:
                rows.append(line.split("|"))

    def ticks(self):
        st = proc_times(self.pid)
        return st[0] if st else 0

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def proc_times(pid):
    """(utime+stime, cutime+cstime) in clock ticks, or None."""
    v = R.proc_stat_fields(pid)
    return (int(v[11]) + int(v[12]), int(v[13]) + int(v[14])) if v else None


def cpu_us(ticks):
    return ticks * 1e6 / R.CLK_TCK


# ----------------------------------------------------------------------------- counters

def snapshot(pg, db, session=None):
    """The counters one phase's figures are the difference of. PostgreSQL's CPU excludes the
    bench's own polling session (the one-shot psql backends of the snapshots themselves stay
    in: a few ms per run)."""
    lsn, recs, fpi, wbytes = pg.rows("SELECT pg_current_wal_lsn(), wal_records, wal_fpi, "
                                     "wal_bytes FROM pg_stat_wal", db=db)[0]
    tables = {}
    for name, ins, upd, hot, dele in pg.rows(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del "
            "FROM pg_stat_user_tables", db=db):
        tables[name] = {"ins": int(ins), "upd": int(upd), "hot": int(hot), "del": int(dele)}
    return {"t": time.time(), "lsn": lsn, "wal_records": int(recs), "wal_fpi": int(fpi),
            "wal_bytes": int(wbytes), "tables": tables,
            "pg_ticks": pg.cpu_ticks() - (session.ticks() if session else 0)}


def indexes(pg, db):
    """{table: [(index, predicate or None), ...]} of the public schema."""
    out = collections.defaultdict(list)
    for tbl, idx, pred in pg.rows(
            "SELECT t.relname, c.relname, coalesce(pg_get_expr(i.indpred, i.indrelid), '') "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_class t ON t.oid = i.indrelid "
            "WHERE t.relnamespace = 'public'::regnamespace ORDER BY 1, 2", db=db):
        out[tbl].append((idx, pred or None))
    return dict(out)


def _partial_counts(pred, ins, upd):
    """Index entries a partial index gets: one the new row version of a non-HOT update
    cannot satisfy (published_at IS NULL, the column the update sets) counts inserts only;
    one an inserted row cannot satisfy (IS NOT NULL) counts updates only. A heuristic for
    the two partial outbox indexes of schema versions 1-5 (migration 6 dropped them), named
    as such in the output."""
    if pred is None:
        return ins + upd
    if "IS NOT NULL" in pred.upper():
        return upd
    if "IS NULL" in pred.upper():
        return ins
    return ins + upd


def delta(a, b, idx, apps, ticks_td=None):
    """Figures of one phase between snapshots a and b; per application = / apps."""
    per = lambda v: round(v / apps, 2) if apps else None  # noqa: E731
    lsn_bytes = lsn_int(b["lsn"]) - lsn_int(a["lsn"])
    tables = {}
    tot = collections.Counter()
    for name in sorted(set(a["tables"]) | set(b["tables"])):
        x = {k: b["tables"].get(name, {}).get(k, 0) - a["tables"].get(name, {}).get(k, 0)
             for k in ("ins", "upd", "hot", "del")}
        if not any(x.values()):
            continue
        nidx = len(idx.get(name, []))
        nonhot = x["upd"] - x["hot"]
        x["non_hot"] = nonhot
        x["indexes"] = nidx
        x["index_entries_est"] = x["ins"] * nidx + nonhot * nidx
        x["index_entries_partial_aware"] = sum(_partial_counts(p, x["ins"], nonhot)
                                               for _, p in idx.get(name, []))
        tables[name] = x
        for k in ("ins", "upd", "hot", "non_hot", "del", "index_entries_est",
                  "index_entries_partial_aware"):
            tot[k] += x[k]
    d = {
        "applications": apps,
        "seconds": round(b["t"] - a["t"], 3),
        "wal_lsn_bytes": lsn_bytes,
        "wal_bytes": b["wal_bytes"] - a["wal_bytes"],
        "wal_records": b["wal_records"] - a["wal_records"],
        "wal_fpi": b["wal_fpi"] - a["wal_fpi"],
        "pg_cpu_us": round(cpu_us(b["pg_ticks"] - a["pg_ticks"])),
        "tables": tables,
        "per_application": {
            "wal_lsn_bytes": per(lsn_bytes),
            "wal_bytes": per(b["wal_bytes"] - a["wal_bytes"]),
            "wal_records": per(b["wal_records"] - a["wal_records"]),
            "heap_inserted": per(tot["ins"]),
            "heap_updated": per(tot["upd"]),
            "heap_hot_updated": per(tot["hot"]),
            "heap_deleted": per(tot["del"]),
            "index_entries_est": per(tot["index_entries_est"]),
            "index_entries_partial_aware": per(tot["index_entries_partial_aware"]),
            "pg_cpu_us": per(cpu_us(b["pg_ticks"] - a["pg_ticks"])),
        },
    }
    if ticks_td is not None:
        d["system_cpu_us"] = round(cpu_us(ticks_td))
        d["per_application"]["system_cpu_us"] = per(cpu_us(ticks_td))
    return d


def lsn_int(lsn):
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


# ----------------------------------------------------------------------------- pg_waldump

_REC = re.compile(r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*\d+, lsn: \S+, "
                  r"prev \S+, desc: (\S+)(.*)$")
_REL = re.compile(r"blkref #\d+: rel (\d+)/(\d+)/(\d+)")


def relation_names(pg, dbs):
    """{(db oid, relfilenode): (table, relation)} for the public schema of each database (an
    index or TOAST relation is named with its table); other relations are 'catalog'."""
    out = {}
    for db in dbs:
        dboid = int(pg.rows(f"SELECT oid FROM pg_database WHERE datname = '{db}'", db=db)[0][0])
        for node, tbl, rel in pg.rows(
                "SELECT pg_relation_filenode(c.oid), coalesce(t.relname, o.relname, c.relname), "
                "  CASE WHEN o.relname IS NOT NULL THEN 'toast' ELSE c.relname END "
                "FROM pg_class c "
                "LEFT JOIN pg_index i ON i.indexrelid = c.oid "
                "LEFT JOIN pg_class t ON t.oid = i.indrelid AND t.relnamespace = 'public'::regnamespace "
                "LEFT JOIN pg_class o ON o.reltoastrelid IN (c.oid, t.oid) "
                "  AND o.relnamespace = 'public'::regnamespace "
                "WHERE (c.relnamespace = 'public'::regnamespace OR t.oid IS NOT NULL OR o.oid IS NOT NULL) "
                "AND pg_relation_filenode(c.oid) IS NOT NULL", db=db):
            out[(dboid, int(node))] = (tbl, rel)
    return out


def wal_split(pg, start_lsn, end_lsn, names):
    """WAL between two LSNs by pg_waldump: bytes and records per table (heap, each index,
    TOAST), and per record type. A record is charged to the relation of its first block
    reference; records without one (commits, running-xacts) go to '(no relation)'."""
    if start_lsn == end_lsn:
        return {"tables": {}, "record_types": {}, "total_bytes": 0, "records": 0}
    r = subprocess.run(R.H.as_postgres([f"{R.PGBIN}/pg_waldump", "-p", os.path.join(pg.data, "pg_wal"),
                                       "-s", start_lsn, "-e", end_lsn]),
                       capture_output=True, text=True)
    tables = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    types = collections.defaultdict(lambda: [0, 0])
    total = nrec = fpi_bytes = 0
    for line in r.stdout.splitlines():
        m = _REC.match(line)
        if not m:
            continue
        rmgr, _rec, tot, op, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        rel = _REL.search(rest)
        if rel:
            tbl, relname = names.get((int(rel.group(2)), int(rel.group(3))), ("(catalog)", "(catalog)"))
        else:
            tbl, relname = "(no relation)", f"{rmgr}"
        cell = tables[tbl][relname]
        cell[0] += tot
        cell[1] += 1
        t = types[f"{rmgr} {op.split('+')[0] if rmgr != 'Heap' else op}"]
        t[0] += tot
        t[1] += 1
        total += tot
        nrec += 1
        if "FPW" in rest:
            fpi_bytes += tot - _rec
    if nrec == 0 and r.returncode != 0:
        raise BenchError(f"pg_waldump failed: {r.stderr.strip()[:500]}")
    out_tables = {}
    for tbl, rels in tables.items():
        out_tables[tbl] = {"bytes": sum(v[0] for v in rels.values()),
                           "records": sum(v[1] for v in rels.values()),
                           "relations": {k: {"bytes": v[0], "records": v[1]}
                                         for k, v in sorted(rels.items(), key=lambda kv: -kv[1][0])}}
    return {"total_bytes": total, "records": nrec, "fpi_bytes": fpi_bytes,
            "tables": dict(sorted(out_tables.items(), key=lambda kv: -kv[1]["bytes"])),
            "record_types": {k: {"bytes": v[0], "records": v[1]}
                             for k, v in sorted(types.items(), key=lambda kv: -kv[1][0])}}


# ----------------------------------------------------------------------------- wrk

def run_wrk(port, seconds, connections, threads, event_id, logfile, lua):
    """wrk against POST /v1/applications; returns its figures (counts, p50/p99 in ms)."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(round(seconds))}s", "--latency", "-s", lua,
            f"http://127.0.0.1:{port}/v1/applications", "--", event_id]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = R.machine_busy()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = R.machine_busy()
    with open(logfile, "w") as f:
        f.write(" ".join(argv) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        raise BenchError(f"wrk exited with {r.returncode}: {r.stderr.strip()[:300]}")
    v = {}
    for line in r.stdout.splitlines():
        k, _, x = line.partition(" ")
        if re.fullmatch(r"[a-z0-9_]+", k) and re.fullmatch(r"-?\d+(\.\d+)?", x.strip() or "x"):
            v[k] = float(x)
    if "status_201" not in v:
        raise BenchError(f"wrk printed no figures: {r.stdout[-300:]}")
    dur = v["duration_us"] / 1e6
    return {"argv": argv, "seconds": round(dur, 3), "accepted": int(v["status_201"]),
            "accepted_per_s": round(v["status_201"] / dur, 1),
            "status_409": int(v["status_409"]), "status_400": int(v["status_400"]),
            "status_other": int(v["status_other"]), "requests": int(v["requests"]),
            "socket_errors": int(v["socket_errors"]), "timeouts": int(v["timeouts"]),
            "p50_ms": v["p50_us"] / 1000, "p90_ms": v["p90_us"] / 1000,
            "p99_ms": v["p99_us"] / 1000, "p999_ms": v["p999_us"] / 1000,
            "max_ms": v["max_us"] / 1000,
            "wrk_cpu_us": round((ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1e6),
            # every CPU of the machine during the load (ours and the other sessions'), so a
            # reader can see how much of the 2 cores this run had
            "machine_busy_cpu_us": round(cpu_us(busy1[0] - busy0[0])),
            "machine_cpu_us": round(cpu_us(busy1[1] - busy0[1]))}


# ----------------------------------------------------------------------------- waiting

def wait_for(cond, timeout, what, interval=0.1):
    """Polls cond() until true; returns the seconds it took. Raises after timeout."""
    t0 = time.monotonic()
    while True:
        if cond():
            return round(time.monotonic() - t0, 3)
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


def http_ready(port, path):
    try:
        return R.http_get(port, path, timeout=2)[0] == 200
    except OSError:
        return False


# ----------------------------------------------------------------------------- the peer

def prepare_peer(scratch):
    """The Node.js peer in a scratch copy (shared/ is read-only): copied once, `npm ci` from
    the npm registry, mockkafka built with -lrdkafka. Returns (node dir, mockkafka path)."""
    node_dir = os.path.join(scratch, "node")
    mock = os.path.join(scratch, "mockkafka")
    if not os.path.isdir(os.path.join(node_dir, "node_modules")):
        log(f"peer: copying {PEER_SRC} to {scratch} and running npm ci")
        if os.path.exists(scratch):
            shutil.rmtree(scratch)
        shutil.copytree(PEER_SRC, scratch)
        for root, dirs, files in os.walk(scratch):
            for n in dirs + files:
                p = os.path.join(root, n)
                os.chmod(p, os.stat(p).st_mode | 0o200)
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=node_dir,
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise BenchError(f"npm ci failed: {r.stderr.strip()[-500:]}")
    if not os.access(mock, os.X_OK):
        r = subprocess.run(["cc", "-O2", "-Wall", "-o", mock, os.path.join(scratch, "mockkafka.c"),
                            "-lrdkafka"], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"building mockkafka failed: {r.stderr.strip()[-500:]}")
    return node_dir, mock
