"""The rush bench (bench/rush): stages a ticket opening against a real ticketd stack and
measures it end to end. See bench/rush --help and bench/RESULTS.md.

One run (run_once):
  throwaway PostgreSQL (fsync on) -> `ticketd kafka-mock` -> the sink (rush_sink.py) ->
  `ticketd serve` -> one warm-up application followed through to processed (the pipeline is
  live: relay, consumer group joined, sink) -> loadgen (open loop: idle, ramp, peak, tail) while
  a sampler thread reads backlog, lag, CPU and RSS once a second -> wait until the backlog and
  the lag are zero -> SQL: commit->ack and publish->processed percentiles, per-second
  committed/published/processed, drain after the peak -> `ticketd audit` (0 missing or the
  run fails) -> DB rows == distinct 201 ids -> JSON + SVG chart -> everything stopped by pid.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "test", "integration"))
import chart  # noqa: E402
import harness as H  # noqa: E402  (the tests' PostgreSQL, processes, kafka-mock, /metrics)

PGBIN = H.PGBIN
IS_ROOT = H.IS_ROOT
CLK_TCK = os.sysconf("SC_CLK_TCK")
ADMIN_TOKEN = "rush-bench-admin-token-0123456789"

# PostgreSQL settings of the bench cluster. Durability stays on (fsync, synchronous_commit,
# full_page_writes are the defaults); the WAL is sized so no checkpoint lands inside a run.
PG_SETTINGS = {
    "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
    "shared_buffers": "256MB", "max_wal_size": "4GB", "checkpoint_timeout": "30min",
    "max_connections": "100",
}


BenchError = H.HarnessError
tail = H.tail
free_port = H.free_port
parse_metrics = H.parse_metrics


def log(msg):
    print(f"[rush {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- processes

class Pg(H.Pg):
    """The tests' throwaway PostgreSQL 15 cluster (harness.Pg) in workdir/pg with the bench's
    settings, stopped cleanly (fast) at the end. tcp: also on 127.0.0.1, url through it."""

    def __init__(self, workdir, tcp=False):
        super().__init__(workdir=workdir, settings=PG_SETTINGS, tcp=tcp, stop_mode="fast")

    def scalar(self, sql):
        rows = self.rows(sql)
        return rows[0][0] if rows else None

    def pids(self):
        """The postmaster and its children (backends, walwriter, ...)."""
        out = [self.pid]
        for d in os.listdir("/proc"):
            if d.isdigit():
                st = proc_stat(int(d))
                if st and st[1] == self.pid:
                    out.append(int(d))
        return out


class Proc(H.Proc):
    """harness.Proc with the log in the run directory, kept quiet at the end."""

    def __init__(self, argv, env, logfile, stdin=subprocess.DEVNULL, stdout_pipe=False):
        super().__init__(argv, env, os.path.basename(logfile), stdin=stdin,
                         stdout_pipe=stdout_pipe, logfile=logfile, echo_log=False)


def http_get(port, path, timeout=5, headers=None):
    r = H.http_request(port, "GET", path, headers=headers, timeout=timeout)
    return r.status, r.body


def http_post_json(port, path, obj, headers=None, timeout=10):
    r = H.http_request(port, "POST", path, json=obj, headers=headers, timeout=timeout)
    return r.status, r.body


def metric_sum(m, name):
    """Sum of every series of the metric (all label sets); None if absent."""
    vals = [v for k, v in m.items() if k == name or k.startswith(name + "{")]
    return sum(vals) if vals else None


def proc_stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name (state is [0]), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(")") + 2:].split()


def proc_stat(pid):
    """(cpu ticks utime+stime, ppid) or None."""
    v = proc_stat_fields(pid)
    return (int(v[11]) + int(v[12]), int(v[1])) if v else None


def proc_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def machine_busy():
    """(busy jiffies, total jiffies) of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": os.uname().release,
            "loadavg": list(os.getloadavg())}


# ----------------------------------------------------------------------------- the stack

class Stack:
    """PostgreSQL + kafka-mock + sink + ticketd for one run; close() stops all by pid."""

    def __init__(self, bins, rundir, partitions, env_extra, canned=False, log_level="warn"):
        self.bins = bins
        self.rundir = rundir
        self.workdir = tempfile.mkdtemp(prefix="ticketd-rush-")
        os.chmod(self.workdir, 0o755)
        self.pg = self.mock = self.sink = self.td = None
        self.group = f"rush-{os.path.basename(rundir)}-{os.getpid()}-{int(time.time())}"
        try:
            self._start(partitions, env_extra, canned, log_level)
        except BaseException:
            self.close()
            raise

    def _start(self, partitions, env_extra, canned, log_level):
        self.pg = Pg(self.workdir)
        base = dict(os.environ)
        base.update({"KAFKA_PARTITIONS": str(partitions), "LOG_LEVEL": log_level})
        self.mock = H.KafkaMock(partitions, env={"LOG_LEVEL": log_level}, bin=self.bins["ticketd"],
                                logfile=os.path.join(self.rundir, "kafka-mock.log"),
                                echo_log=False)
        self.brokers = self.mock.brokers
        self.sink = Proc([sys.executable, os.path.join(HERE, "rush_sink.py")], dict(os.environ),
                         os.path.join(self.rundir, "sink.log"), stdin=subprocess.PIPE,
                         stdout_pipe=True)
        self.sink_port = int(self.sink.read_line("port=", 30))
        self.port = free_port()
        self.env = dict(base)
        self.env.update({
            "DATABASE_URL": self.pg.url, "KAFKA_BROKERS": self.brokers,
            "LISTEN": f"127.0.0.1:{self.port}", "ADMIN_TOKEN": ADMIN_TOKEN,
            "DATA_PLATFORM_URL": f"http://127.0.0.1:{self.sink_port}/events",
            "SMTP_URL": "", "CONSUMER_GROUP": self.group,
        })
        self.canned = canned
        self.env.update(env_extra)
        # the HTTP ceiling: the bench-only build that answers 201 without a database
        self.td = Proc([self.bins["ticketd-canned" if canned else "ticketd"], "serve"], self.env,
                       os.path.join(self.rundir, "ticketd.log"))
        deadline = time.monotonic() + 60
        while True:
            if not self.td.alive():
                raise BenchError(f"ticketd exited at start-up:\n{tail(self.td.logfile)}")
            try:
                if http_get(self.port, "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"ticketd not ready after 60 s:\n{tail(self.td.logfile)}")
            time.sleep(0.2)

    def metrics(self):
        st, body = http_get(self.port, "/metrics", timeout=5)
        return parse_metrics(body.decode()) if st == 200 else {}

    def close(self):
        problems = []
        for name in ("td", "sink", "mock"):
            p = getattr(self, name)
            if p is not None:
                try:
                    rc = p.stop()
                    if name == "td" and rc not in (0, None):
                        problems.append(f"ticketd exited with {rc} on SIGTERM")
                except Exception as e:
                    problems.append(f"stopping {name}: {e}")
                setattr(self, name, None)
        if self.pg is not None:
            try:
                self.pg.close()
            except Exception as e:
                problems.append(f"stopping PostgreSQL: {e}")
            self.pg = None
        if not os.environ.get("RUSH_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


# ----------------------------------------------------------------------------- sampling

class Sampler(threading.Thread):
    """Once a second: outbox backlog (SQL), consumer lag (/metrics), CPU% and RSS of ticketd,
    CPU% of PostgreSQL (all its processes), loadgen and the sink, and the machine's busy%."""

    def __init__(self, stack, t0, interval=1.0):
        super().__init__(daemon=True)
        self.stack, self.t0, self.interval = stack, t0, interval
        self.samples = []
        self.stop_event = threading.Event()
        self.loadgen_pid = None
        self.db = not stack.canned
        self._prev = {}

    def _cpu(self, key, pids, now):
        """CPU % (of one core) of the processes since the last call. Per pid, so a process
        that exits drops out instead of making the sum go negative; a new one counts from 0."""
        ticks = {}
        for pid in pids:
            st = proc_stat(pid)
            if st:
                ticks[pid] = st[0]
        prev = self._prev.get(key)
        self._prev[key] = (ticks, now)
        if not prev or now <= prev[1] or not ticks:
            return None
        used = sum(t - prev[0].get(pid, 0) for pid, t in ticks.items())
        return round(100.0 * max(0, used) / CLK_TCK / (now - prev[1]), 1)

    def sample(self):
        now = time.time()
        s = {"t": round(now - self.t0, 3)}
        try:
            s["backlog"] = int(self.stack.pg.scalar(
                "SELECT count(*) FROM outbox_status WHERE published_at IS NULL"))
        except Exception:
            s["backlog"] = None
        try:
            m = self.stack.metrics()
        except OSError:
            m = {}
        lag = metric_sum(m, "ticketd_consumer_lag")
        s["lag"] = int(lag) if lag is not None else None
        for key, name in (("ingest_pending", "ticketd_ingest_pending"),
                          ("http_pending", "ticketd_http_pending_requests")):
            v = metric_sum(m, name)
            s[key] = int(v) if v is not None else None
        s["ticketd_cpu"] = self._cpu("td", [self.stack.td.pid], now)
        s["ticketd_rss_mb"] = round(proc_rss_mb(self.stack.td.pid) or 0, 1)
        s["pg_cpu"] = self._cpu("pg", self.stack.pg.pids(), now)
        s["sink_cpu"] = self._cpu("sink", [self.stack.sink.pid], now)
        if self.loadgen_pid:
            s["loadgen_cpu"] = self._cpu("lg", [self.loadgen_pid], now)
        busy, total = machine_busy()
        prev = self._prev.get("machine")
        self._prev["machine"] = (busy, total)
        if prev and total > prev[1]:
            s["machine_busy_pct"] = round(100.0 * (busy - prev[0]) / (total - prev[1]), 1)
        return s

    def run(self):
        nxt = time.time()
        while not self.stop_event.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as e:  # a sample must never kill the run
                self.samples.append({"t": round(time.time() - self.t0, 3), "error": str(e)})
            nxt += self.interval
            self.stop_event.wait(max(0.0, nxt - time.time()))

    def stop(self):
        self.stop_event.set()
        self.join(timeout=10)


# ----------------------------------------------------------------------------- one run

def _pct_sql(expr, frm):
    return (f"SELECT count(*), round(percentile_cont(0.5) WITHIN GROUP (ORDER BY {expr})::numeric, 3), "
            f"round(percentile_cont(0.99) WITHIN GROUP (ORDER BY {expr})::numeric, 3), "
            f"round(percentile_cont(0.999) WITHIN GROUP (ORDER BY {expr})::numeric, 3), "
            f"round(max({expr})::numeric, 3) FROM {frm}")


def _pct_row(row):
    n, p50, p99, p999, mx = row
    f = lambda v: float(v) if v not in (None, "") else None  # noqa: E731
    return {"count": int(n), "p50_ms": f(p50), "p99_ms": f(p99), "p999_ms": f(p999), "max_ms": f(mx)}


def _per_second(pg, ts_expr, frm, t0):
    rows = pg.rows(f"SELECT floor(extract(epoch FROM {ts_expr}) - {t0:.6f})::int AS s, count(*) "
                   f"FROM {frm} GROUP BY 1 ORDER BY 1")
    return {int(s): int(n) for s, n in rows}


def warm_up(stack, timeout=60):
    """One application followed to processed_events: relay, consumer group and sink are live.
    Returns the highest outbox id before the measured load."""
    st, body = http_post_json(stack.port, "/v1/applications",
                              {"event_id": "rush-warmup", "phone": "010-0000-0000", "name": "Warm Up"})
    if st != 201:
        raise BenchError(f"warm-up application answered {st}: {body[:200]!r}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(stack.pg.scalar("SELECT count(*) FROM processed_events")) >= 1:
            return int(stack.pg.scalar("SELECT coalesce(max(id), 0) FROM outbox"))
        time.sleep(0.2)
    raise BenchError(f"warm-up application not processed within {timeout} s (relay/consumer?):\n"
                     f"{tail(stack.td.logfile)}")


def wait_drained(stack, sampler, timeout, stall=30.0):
    """Polls until backlog == 0, lag == 0 and every outbox row is processed (or, for a canned
    run, at once). Returns (seconds since t0 when it was first seen drained, or None)."""
    deadline = time.monotonic() + timeout
    last, last_change = None, time.monotonic()
    while time.monotonic() < deadline:
        backlog = int(stack.pg.scalar("SELECT count(*) FROM outbox_status WHERE published_at IS NULL"))
        lag = metric_sum(stack.metrics(), "ticketd_consumer_lag") or 0
        now = time.time()
        if backlog == 0 and lag == 0:
            rows = stack.pg.rows("SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM processed_events)"
                                 " , (SELECT count(DISTINCT event_id) FROM dead_letters)")
            total, processed, dead = (int(x) for x in rows[0])
            if processed + dead >= total:
                return round(now - sampler.t0, 3)
        state = (backlog, lag)
        if state != last:
            last, last_change = state, time.monotonic()
        elif time.monotonic() - last_change > stall:
            log(f"no progress for {stall:.0f} s (backlog {backlog}, lag {lag}); giving up waiting")
            return None
        time.sleep(0.25)
    log(f"not drained within {timeout:.0f} s")
    return None


def summarize_loadgen(lg, cfg):
    """Peak-window figures from loadgen's per-second entries."""
    secs = lg.get("seconds", [])
    if cfg["rate"] > 0 or cfg.get("crowd"):
        start = cfg["idle"] + cfg["ramp"]
        end = start + cfg["duration"]
        peak = [s for s in secs if s["t"] >= math.ceil(start) and s["t"] + 1 <= math.floor(end) + 1e-9]
    else:  # closed loop: every full second but the first (connections warming up)
        peak = [s for s in secs[1:] if s["t"] + 1 <= lg["totals"]["elapsed_s"]]
    if not peak:
        peak = secs
    n = max(1, len(peak))
    answered = lambda s: s["201"] + s["409"] + s["400"] + s["503"] + s["429"] + s["other"]  # noqa: E731
    p99s = sorted(s["p99_ms"] for s in peak if answered(s))
    out = {
        "seconds": len(peak),
        "accepted_per_s": round(sum(s["201"] for s in peak) / n, 1),
        "answered_per_s": round(sum(answered(s) for s in peak) / n, 1),
        "sent_per_s": round(sum(s["sent"] for s in peak) / n, 1),
        "p50_ms_median": median([s["p50_ms"] for s in peak if answered(s)]),
        "p99_ms_median": median(p99s),
        "p99_ms_max": p99s[-1] if p99s else None,
        "p999_ms_max": max((s["p999_ms"] for s in peak if answered(s)), default=None),
        "errors": sum(s["errors"] for s in peak),
        "s503": sum(s["503"] for s in peak),
    }
    return out


def median(v):
    v = sorted(x for x in v if x is not None)
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else round((v[m - 1] + v[m]) / 2, 3)


def run_once(bins, cfg, rundir, label):
    """One staged opening on a fresh stack. cfg: connections, rate, idle, ramp, duration, tail,
    tail_rate, total, partitions, env (dict), canned, ingest_only, drain_timeout, timeout_ms,
    log_level. canned: the bench-only ticketd-canned binary, no DB checks. ingest_only: ROLE=api (no relay, no consumer):
    the DB rows are checked, the pipeline (drain, audit) is not.
    Returns the run's result dict (never raises for a failed check; raises BenchError when
    the stack cannot be brought up)."""
    os.makedirs(rundir, exist_ok=True)
    canned = bool(cfg.get("canned"))
    pipeline = not canned and not cfg.get("ingest_only")
    event_id = f"rush-{label}-{time.strftime('%H%M%S')}"[:64]
    res = {"label": label, "event_id": event_id, "config": cfg, "problems": [], "ok": False,
           "loadavg_start": list(os.getloadavg())}
    log(f"{label}: starting PostgreSQL, kafka-mock ({cfg['partitions']} partitions), sink, ticketd"
        f" ({' '.join(f'{k}={v}' for k, v in cfg['env'].items()) or 'defaults'}"
        f"{', CANNED' if canned else ''})")
    try:
        env = dict(cfg["env"], ROLE="api") if cfg.get("ingest_only") else cfg["env"]
        stack = Stack(bins, rundir, cfg["partitions"], env, canned=canned,
                      log_level=cfg.get("log_level", "warn"))
    except BenchError as e:
        res["problems"].append(f"the stack did not come up: {e}")
        return res
    sampler = None
    try:
        base_id = warm_up(stack) if pipeline else 0
        wal0 = stack.pg.rows("SELECT pg_current_wal_lsn()")[0][0] if not canned else None
        ids_path = os.path.join(rundir, "ids.txt")
        lg_json = os.path.join(rundir, "loadgen.json")
        argv = [bins["loadgen"], "--port", str(stack.port), "--connections", str(cfg["connections"]),
                "--rate", str(cfg["rate"]), "--idle", str(cfg["idle"]), "--ramp", str(cfg["ramp"]),
                "--duration", str(cfg["duration"]), "--tail", str(cfg["tail"]),
                "--tail-rate", str(cfg["tail_rate"]), "--event-id", event_id,
                "--timeout-ms", str(cfg.get("timeout_ms", 2000)), "--json", lg_json, "--ids", ids_path]
        if cfg.get("total"):
            argv += ["--total", str(cfg["total"])]
        if cfg.get("crowd"):
            argv += ["--crowd", "--sources", str(cfg.get("sources", 1)),
                     "--give-up", str(cfg.get("give_up", 120))]
        res["loadgen_argv"] = argv
        t0 = time.time()
        sampler = Sampler(stack, t0)
        sampler.samples.append(sampler.sample())  # baseline for the CPU deltas
        sampler.start()
        with open(os.path.join(rundir, "loadgen.log"), "wb") as lgl:
            lg = subprocess.Popen(argv, stdout=lgl, stderr=lgl, preexec_fn=H._die_with_parent)
            sampler.loadgen_pid = lg.pid
            limit = (cfg["idle"] + cfg["ramp"] + cfg["duration"] + cfg["tail"] + 60
                     + (cfg.get("give_up", 120) if cfg.get("crowd") else 0))
            try:
                rc = lg.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                lg.kill()
                lg.wait()
                raise BenchError(f"loadgen still running after {limit:.0f} s")
        t_load_end = round(time.time() - t0, 3)
        if rc != 0:
            raise BenchError(f"loadgen exited with {rc}: {tail(os.path.join(rundir, 'loadgen.log'))}")
        with open(lg_json) as f:
            loadgen = json.load(f)
        res["loadgen"] = loadgen
        res["peak"] = summarize_loadgen(loadgen, cfg)
        res["t_load_end"] = t_load_end
        peak_end = cfg["idle"] + cfg["ramp"] + cfg["duration"]
        res["t_peak_start"] = cfg["idle"] + cfg["ramp"]
        res["t_peak_end"] = peak_end
        if not pipeline:
            time.sleep(1.0)
            res["t_drained"] = None
        else:
            log(f"{label}: load done ({loadgen['totals']['201']} x 201 in {t_load_end:.1f} s); "
                f"waiting for the backlog and the lag to reach zero")
            res["t_drained"] = wait_drained(stack, sampler, cfg.get("drain_timeout", 180))
            time.sleep(1.0)  # one more sample at zero; the consumer's offset commit (<= 200 ms)
        sampler.stop()
        res["samples"] = sampler.samples
        try:
            m = stack.metrics()
            res["metrics_end"] = {k: v for k, v in m.items()
                                  if k.startswith("ticketd_") and "partition=" not in k
                                  and "_bucket{" not in k}
        except OSError:
            res["metrics_end"] = {}
        if pipeline:
            res["db"] = db_figures(stack.pg, base_id, t0, peak_end, t_load_end)
            res["audit"] = run_audit(bins, stack, event_id, rundir)
        if not canned:
            res["ids"] = check_ids(stack.pg, ids_path, event_id, loadgen)
            # work per application: WAL written from the start of the load to the drain
            # (ingest, relay marks, consumer effects), over the rows of the run
            wal = int(float(stack.pg.rows(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{wal0}')")[0][0]))
            res["wal_bytes"] = wal
            if res["ids"]["db_rows"]:
                res["wal_bytes_per_application"] = round(wal / res["ids"]["db_rows"])
            try:
                res["sink_posts"] = json.loads(http_get(stack.sink_port, "/_count")[1])["posts"]
            except (OSError, ValueError, KeyError):
                res["sink_posts"] = None
        evaluate(res, canned, pipeline)
    except BenchError as e:
        res["problems"].append(str(e))
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
            res.setdefault("samples", sampler.samples)
        res["problems"] += stack.close()
        res["ok"] = not res["problems"]
    res["chart"] = write_run_chart(res, os.path.join(rundir, "chart.svg"))
    return res


def db_figures(pg, base_id, t0, peak_end, t_load_end):
    """Latencies and per-second series computed from the rows' own timestamps."""
    frm_o = f"outbox_status o WHERE o.id > {base_id} AND o.published_at IS NOT NULL"
    d = {}
    d["commit_to_ack"] = _pct_row(pg.rows(_pct_sql(
        "extract(epoch FROM o.published_at - o.created_at) * 1000", frm_o))[0])
    frm_p = (f"outbox_status o JOIN processed_events p ON p.event_id = o.event_id WHERE o.id > {base_id}")
    d["publish_to_processed"] = _pct_row(pg.rows(_pct_sql(
        "extract(epoch FROM p.processed_at - o.published_at) * 1000", frm_p))[0])
    d["commit_to_processed"] = _pct_row(pg.rows(_pct_sql(
        "extract(epoch FROM p.processed_at - o.created_at) * 1000", frm_p))[0])
    d["per_second"] = {
        "committed": _per_second(pg, "o.created_at", f"outbox o WHERE o.id > {base_id}", t0),
        "published": _per_second(pg, "o.published_at", frm_o, t0),
        "processed": _per_second(pg, "p.processed_at", frm_p, t0),
    }
    # Drain after the peak, exact from the rows: when was the last row committed by the end
    # of the peak published (and processed)? 0 if the relay/consumer never fell behind.
    row = pg.rows(
        f"SELECT extract(epoch FROM max(o.published_at)) - {t0 + peak_end:.6f}, "
        f"extract(epoch FROM max(p.processed_at)) - {t0 + peak_end:.6f}, count(*) "
        f"FROM outbox_status o LEFT JOIN processed_events p ON p.event_id = o.event_id "
        f"WHERE o.id > {base_id} AND o.created_at <= to_timestamp({t0 + peak_end:.6f})")[0]
    f = lambda v: round(max(0.0, float(v)), 3) if v not in (None, "") else None  # noqa: E731
    d["drain_after_peak"] = {"publish_s": f(row[0]), "process_s": f(row[1]),
                             "rows_committed_by_peak_end": int(row[2])}
    row = pg.rows(f"SELECT extract(epoch FROM max(o.published_at)) - {t0 + t_load_end:.6f}, "
                  f"extract(epoch FROM max(p.processed_at)) - {t0 + t_load_end:.6f} "
                  f"FROM outbox_status o LEFT JOIN processed_events p ON p.event_id = o.event_id "
                  f"WHERE o.id > {base_id}")[0]
    d["drain_after_load_end"] = {"publish_s": f(row[0]), "process_s": f(row[1])}
    pub = d["per_second"]["published"]
    proc = d["per_second"]["processed"]
    d["relay_peak_per_s"] = max(pub.values()) if pub else 0
    d["consumer_peak_per_s"] = max(proc.values()) if proc else 0
    counts = pg.rows("SELECT (SELECT count(*) FROM outbox_status WHERE published_at IS NULL), "
                     "(SELECT count(*) FROM dead_letters), "
                     "(SELECT count(*) FROM event_effects WHERE NOT done)")[0]
    d["unpublished_at_end"], d["dead_letters"], d["effects_not_done"] = (int(x) for x in counts)
    return d


def run_audit(bins, stack, event_id, rundir):
    r = subprocess.run([bins["ticketd"], "audit", "--event-id", event_id], env=stack.env,
                       capture_output=True, text=True, timeout=600)
    with open(os.path.join(rundir, "audit.txt"), "w") as f:
        f.write(r.stdout + r.stderr)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    verdict = lines[-1].strip() if lines else (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"rc": r.returncode, "verdict": verdict, "output": os.path.join(rundir, "audit.txt")}


def client_unanswered(loadgen):
    """Requests sent that got neither an answer nor a transport error: in flight when loadgen
    stopped (it stops two timeouts after the schedule ends, whatever is still open). Such a
    request may have committed; the client never learned its id."""
    t = loadgen["totals"]
    sent = sum(s["sent"] for s in loadgen["seconds"])
    answered = t["201"] + t["409"] + t["400"] + t["503"] + t["429"] + t["other"]
    return max(0, sent - answered - t["errors"]), sent


def check_ids(pg, ids_path, event_id, loadgen):
    """DB rows of the event == distinct applicants answered 201, and every such applicant has
    its row. loadgen writes the application key (the phone, digits) of each 201, not anything
    from the body, so this holds whatever a 201 body carries; rows are looked up by
    (event_id, phone) as the test harness does."""
    with open(ids_path) as f:
        ids = f.read().split()
    distinct = len(set(ids))
    os.chmod(ids_path, 0o644)
    rows = pg.rows("CREATE TEMP TABLE got (phone text)", f"\\copy got FROM '{ids_path}'",
                   f"SELECT (SELECT count(*) FROM applications WHERE event_id = '{event_id}'), "
                   f"(SELECT count(DISTINCT g.phone) FROM got g JOIN applications a ON "
                   f"a.phone = g.phone AND a.event_id = '{event_id}'), "
                   f"(SELECT count(*) FROM applications a JOIN outbox o ON o.aggregate_id = a.id "
                   f"WHERE a.event_id = '{event_id}')")[0]
    db_rows, found, outbox_rows = (int(x) for x in rows)
    unanswered, sent = client_unanswered(loadgen)
    return {"answers_201": len(ids), "distinct_201_ids": distinct, "db_rows": db_rows,
            "ids_with_row": found, "ids_without_row": distinct - found,
            "outbox_rows": outbox_rows, "client_errors": loadgen["totals"]["errors"],
            "client_unanswered": unanswered, "sent": sent,
            "scheduled_never_sent": max(0, loadgen["totals"]["scheduled"] - sent)}


def evaluate(res, canned, pipeline):
    p = res["problems"]
    if canned:
        return
    a = res.get("audit")
    if a and (a["rc"] != 0 or " 0 missing" not in a["verdict"]):
        p.append(f"audit: {a['verdict']} (exit {a['rc']})")
    ids = res.get("ids")
    if ids:
        if ids["ids_without_row"]:
            p.append(f"{ids['ids_without_row']} ids answered 201 have no application row")
        extra = ids["db_rows"] - ids["distinct_201_ids"]
        unknown = ids["client_errors"] + ids["client_unanswered"]
        if extra < 0 or extra > unknown:
            p.append(f"DB rows {ids['db_rows']} != distinct 201 ids {ids['distinct_201_ids']}")
        elif extra > 0:
            res.setdefault("notes", []).append(
                f"{extra} rows committed for requests whose answer the client never read "
                f"({ids['client_unanswered']} in flight when loadgen stopped, {ids['client_errors']} "
                f"transport errors); no 201 without a row")
        if ids["outbox_rows"] != ids["db_rows"]:
            p.append(f"outbox rows {ids['outbox_rows']} != application rows {ids['db_rows']}")
    if pipeline and res.get("t_drained") is None:
        p.append("backlog/lag did not reach zero")


# ----------------------------------------------------------------------------- charts

def write_run_chart(res, path):
    try:
        svg = run_chart_svg(res)
    except Exception as e:  # a chart must not hide the figures
        log(f"chart failed: {e}")
        return None
    with open(path, "w") as f:
        f.write(svg)
    return path


def run_chart_svg(res):
    C = chart.PALETTE
    secs = res.get("loadgen", {}).get("seconds", [])
    db = res.get("db", {})
    ps = db.get("per_second", {})
    thr = [{"name": "accepted (201)/s", "color": C[0],
            "points": [(s["t"] + 0.5, s["201"]) for s in secs]},
           {"name": "sent/s", "color": "#aaaaaa", "points": [(s["t"] + 0.5, s["sent"]) for s in secs]}]
    if any(s["503"] for s in secs):
        thr.append({"name": "503/s", "color": C[3], "points": [(s["t"] + 0.5, s["503"]) for s in secs]})
    if ps.get("published"):
        thr.append({"name": "published/s", "color": C[2],
                    "points": sorted((k + 0.5, v) for k, v in ps["published"].items() if k >= 0)})
    if ps.get("processed"):
        thr.append({"name": "processed/s", "color": C[4],
                    "points": sorted((k + 0.5, v) for k, v in ps["processed"].items() if k >= 0)})
    p99 = [{"name": "p99 latency ms", "color": C[1],
            "points": [(s["t"] + 0.5, s["p99_ms"] if (s["201"] + s["409"] + s["400"]) else None)
                       for s in secs]}]
    samples = [s for s in res.get("samples", []) if "error" not in s]
    marks = []
    cfg = res["config"]
    if cfg["rate"] > 0 or cfg.get("crowd"):
        marks = [(cfg["idle"], "ramp"), (res.get("t_peak_start", 0), "peak"),
                 (res.get("t_peak_end", 0), "peak end")]
    if res.get("t_load_end"):
        marks.append((res["t_load_end"], "load end"))
    panels = [
        {"title": "throughput per second and p99 latency", "xlabel": "seconds since the load started",
         "left": {"label": "requests or events / s", "series": thr},
         "right": {"label": "p99 ms (log)", "series": p99, "log": True}, "marks": marks},
        {"title": "outbox backlog (unpublished rows) and consumer lag (events)",
         "xlabel": "seconds since the load started",
         "left": {"label": "rows / events", "series": [
             {"name": "outbox backlog", "color": C[3],
              "points": [(s["t"], s.get("backlog")) for s in samples]},
             {"name": "consumer lag", "color": C[4],
              "points": [(s["t"], s.get("lag")) for s in samples]}]}, "marks": marks},
        {"title": "CPU (% of one core) and ticketd RSS", "xlabel": "seconds since the load started",
         "left": {"label": "CPU %", "series": [
             {"name": n, "color": c, "points": [(s["t"], s.get(k)) for s in samples]}
             for n, k, c in (("ticketd", "ticketd_cpu", C[0]), ("PostgreSQL", "pg_cpu", C[2]),
                             ("loadgen", "loadgen_cpu", C[5]), ("sink", "sink_cpu", C[6]))]},
         "right": {"label": "ticketd RSS MB", "series": [
             {"name": "ticketd RSS MB", "color": C[1],
              "points": [(s["t"], s.get("ticketd_rss_mb")) for s in samples]}]}, "marks": marks},
    ]
    title = f"rush {res['label']}: {cfg['connections']} connections, " + (
        "a crowd (one person per connection, Retry-After honoured)" if cfg.get("crowd") else
        f"open loop {cfg['rate']:,.0f} req/s peak" if cfg["rate"] > 0 else "closed loop")
    return chart.line_chart(title, panels)


def sweep_chart_svg(steps):
    C = chart.PALETTE
    pts = [s for s in steps if s.get("peak")]
    return chart.line_chart("saturation sweep: accepted/s and p99 against the offered rate", [{
        "title": "each point: one run on a fresh stack", "xlabel": "offered requests / s",
        "left": {"label": "per second", "series": [
            {"name": "accepted (201)/s", "color": C[0],
             "points": [(s["rate"], s["peak"]["accepted_per_s"]) for s in pts]},
            {"name": "answered/s", "color": C[2],
             "points": [(s["rate"], s["peak"]["answered_per_s"]) for s in pts]}]},
        "right": {"label": "p99 ms (log)", "log": True, "series": [
            {"name": "p99 ms (peak, median of seconds)", "color": C[1],
             "points": [(s["rate"], s["peak"]["p99_ms_median"]) for s in pts]},
            {"name": "p99 ms (whole run)", "color": C[3],
             "points": [(s["rate"], s.get("loadgen", {}).get("totals", {}).get("p99_ms")) for s in pts]}]}}])
