"""One soak run: the servers, the replicas in their namespaces, the supervisor that restarts
replicas (as Kubernetes would), the fault executor and the load; then check.py."""
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import harness as h
from fake_sink import FakeSink
from fake_smtp import FakeSmtp

import check
import faults as fx
from faults import log
from load import Load



# Exit status when the Kafka mock itself aborted (librdkafka 2.0.2's mock asserts in its
# group coordinator under some rejoin races; KAFKA-MOCK.md): nothing of ticketd was judged.
MOCK_DIED = 3

def known_settings():
    """Environment variables this ticketd's config table knows (older code may not know
    the settings that other branches add, and a replica must not depend on them)."""
    r = h.run_ticketd(["config-table"])
    return {line.split("`")[1] for line in r.stdout.splitlines() if line.startswith("| `")}


class Replica:
    """ticketd serve in netns i, listening on its veth address; restarted by the supervisor
    while .want is set. Each incarnation's log is kept in the run directory."""

    def __init__(self, idx, net, env, rundir):
        self.idx = idx
        self.net = net
        self.ip = net.replica_ip(idx)
        self.port = h.free_port()
        self.env = dict(os.environ)
        self.env.update(env)
        self.env["LISTEN"] = f"{self.ip}:{self.port}"
        self.rundir = rundir
        self.proc = None
        self.incarnation = 0
        self.want = True
        self.killed = False            # the current incarnation died of the soak's SIGKILL
        self.busy = threading.Lock()   # one process fault at a time (kill / pause)
        self.mu = threading.Lock()     # want/killed/proc against the supervisor

    def start(self):
        self.incarnation += 1
        self.killed = False
        name = f"replica{self.idx}.{self.incarnation}"
        self.proc = h._Proc(["nsenter", f"--net={self.net.ns_path(self.idx)}", h.BIN, "serve"],
                            self.env, name)

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def signal(self, sig):
        if self.proc:
            self.proc.signal(sig)

    def kill(self):
        with self.mu:
            self.want = False
            self.killed = True
            if self.proc:
                self.proc.kill()

    def request(self, method, path, timeout=2):
        return h.http_request(self.port, method, path, host=self.ip, timeout=timeout)

    def healthy(self):
        try:
            return self.alive() and self.request("GET", "/healthz").status == 200
        except OSError:
            return False

    def relay_active(self):
        try:
            body = self.request("GET", "/metrics", timeout=1).body.decode()
        except OSError:
            return False
        return any(line.startswith("ticketd_relay_active ") and line.split()[-1] in ("1", "1.0")
                   for line in body.splitlines())

    def archive(self):
        """Copies the current incarnation's log into the run directory, closes it."""
        if self.proc is None:
            return
        try:
            self.proc._log.flush()
            shutil.copy(self.proc.logfile, os.path.join(self.rundir, f"{self.proc.name}.log"))
        except OSError:
            pass
        self.proc.close()


class Supervisor(threading.Thread):
    """Restarts a replica that is not running while it is wanted (restartPolicy: Always);
    an exit the soak did not cause is recorded."""

    def __init__(self, replicas, t0, kafka, rundir):
        super().__init__(daemon=True, name="supervisor")
        self.replicas = replicas
        self.t0 = t0
        self.kafka = kafka
        self.rundir = rundir
        self.halt = threading.Event()
        self.unexpected = []
        self.kafka_died = None

    def run(self):
        while not self.halt.wait(0.5):
            if self.kafka_died is None and not self.kafka.alive():
                # The topic lived in that process: the run cannot be judged any more.
                self.kafka_died = {"t": round(time.time() - self.t0, 2),
                                   "rc": self.kafka.proc.returncode}
                shutil.copy(self.kafka.logfile, os.path.join(self.rundir, "kafka-mock.log"))
                with open(self.kafka.logfile, errors="replace") as f:
                    self.kafka_died["last_line"] = (f.read().strip().splitlines() or [""])[-1]
                log(f"soak: kafka-mock DIED: {self.kafka_died}; its log is in {self.rundir}")
            for r in self.replicas:
                with r.mu:
                    if not r.want or r.alive():
                        continue
                    if r.proc is not None and not r.killed:
                        rc = r.proc.proc.returncode
                        self.unexpected.append({"t": round(time.time() - self.t0, 2),
                                                "replica": r.idx, "incarnation": r.incarnation,
                                                "rc": rc})
                        log(f"soak: replica{r.idx}.{r.incarnation} exited by itself (rc {rc})")
                    r.archive()
                    r.start()


class Executor:
    """Runs each fault of the schedule on its own thread at its time; records what it did."""

    def __init__(self, env, t0):
        self.env = env   # dict: pg, kafka, sink, smtp, net, replicas, kafka_ports, pg_port
        self.t0 = t0
        self.journal = []
        self.lock = threading.Lock()
        self.threads = []
        self.resources = {}              # resource -> Lock: one fault at a time on each
        self.local = threading.local()   # .until: when the fault of this thread heals

    def note(self, f, what):
        with self.lock:
            self.journal.append({"t": round(time.monotonic() - self.t0, 2), "wall": time.time(),
                                 "kind": f["kind"], "params": f["params"], "what": what})
        log(f"soak: {time.monotonic() - self.t0:7.2f}s {f['kind']}: {what}")

    def run(self, schedule):
        for f in schedule:
            delay = self.t0 + f["at"] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = threading.Thread(target=self._one, args=(f,), daemon=True, name=f["kind"])
            t.start()
            self.threads.append(t)
        for t in self.threads:
            t.join(timeout=120)

    def _hold(self, f):
        left = self.local.until - time.monotonic()
        if left > 0:
            time.sleep(left)

    def _one(self, f):
        # The previous fault on this resource may still be healing (PostgreSQL starting up
        # on a busy machine): wait for it, then hold for the scheduled length.
        with self.lock:
            lock = self.resources.setdefault(f["resource"], threading.Lock())
        with lock:
            late = time.monotonic() - (self.t0 + f["at"])
            if late > 1.0:
                self.note(f, f"starts {late:.1f}s late (resource {f['resource']} was busy)")
            self.local.until = time.monotonic() + f["end"] - f["at"]
            try:
                getattr(self, "f_" + f["kind"])(f, f["params"])
            except Exception as e:
                self.note(f, f"fault error: {e!r}")

    # -- processes
    def f_kill(self, f, p):
        r = self.env["replicas"][p["replica"]]
        if not r.busy.acquire(blocking=False):
            return self.note(f, f"replica{r.idx} busy, skipped")
        try:
            r.kill()
            self.note(f, f"SIGKILL replica{r.idx}.{r.incarnation}")
            self._hold(f)
            r.want = True
            self.note(f, f"replica{r.idx} may restart")
        finally:
            r.busy.release()

    def _pause(self, f, r):
        if not r.busy.acquire(blocking=False):
            return self.note(f, f"replica{r.idx} busy, skipped")
        try:
            r.signal(signal.SIGSTOP)
            self.note(f, f"SIGSTOP replica{r.idx}.{r.incarnation}")
            self._hold(f)
        finally:
            r.signal(signal.SIGCONT)
            r.busy.release()
        self.note(f, f"SIGCONT replica{r.idx}")

    def f_pause_leader(self, f, p):
        leaders = [r for r in self.env["replicas"] if r.relay_active()]
        if not leaders:
            return self.note(f, "no replica reports ticketd_relay_active 1, skipped")
        self._pause(f, leaders[0])

    def f_pause_consumer(self, f, p):
        self._pause(f, self.env["replicas"][p["replica"]])

    # -- PostgreSQL
    def f_pg_restart(self, f, p):
        pg = self.env["pg"]
        pg.stop(mode=p["mode"])
        self.note(f, f"PostgreSQL stopped ({p['mode']})")
        self._hold(f)
        pg.start()
        self.note(f, "PostgreSQL started")

    def _span(self, f, inject, injected, heal, healed):
        """inject(), hold for the fault's length, heal() (also after an error)."""
        inject()
        self.note(f, injected)
        try:
            self._hold(f)
        finally:
            heal()
        self.note(f, healed)

    def f_pg_read_only(self, f, p):
        pg = self.env["pg"]
        self._span(f, lambda: fx.pg_set_read_only(pg, True), "PostgreSQL read-only",
                   lambda: fx.pg_set_read_only(pg, False), "PostgreSQL writable")

    def f_pg_pause(self, f, p):
        pg = self.env["pg"]
        pids = fx.pg_pids(pg)
        self._span(f, lambda: fx.signal_pids(pids, signal.SIGSTOP),
                   f"SIGSTOP {len(pids)} PostgreSQL processes",
                   lambda: fx.signal_pids(set(pids) | set(fx.pg_pids(pg)), signal.SIGCONT),
                   "SIGCONT PostgreSQL")

    # -- Kafka
    def f_kafka_down_all(self, f, p):
        k = self.env["kafka"]
        self._span(f, k.down, "all brokers down", k.up, "all brokers up")

    def f_kafka_down_one(self, f, p):
        k, b = self.env["kafka"], p["broker"]
        self._span(f, lambda: k.down(b), f"broker {b} down", lambda: k.up(b), f"broker {b} up")

    def f_kafka_pause(self, f, p):
        k = self.env["kafka"]
        self._span(f, lambda: k.signal(signal.SIGSTOP), "SIGSTOP kafka-mock",
                   lambda: k.signal(signal.SIGCONT), "SIGCONT kafka-mock")

    def f_produce_errors(self, f, p):
        k = self.env["kafka"]
        self._span(f, lambda: k.command(f"produce-errors {p['count']} {fx_err(p['error'])}"),
                   f"next {p['count']} Produce requests answer {p['error']}",
                   lambda: k.command("clear-errors"), "produce errors cleared")

    # -- sink, SMTP
    def f_sink_500(self, f, p):
        sink = self.env["sink"]
        self._span(f, lambda: sink.fail_all(500), "sink answers 500", sink.ok, "sink answers 200")

    def f_sink_timeout(self, f, p):
        sink = self.env["sink"]
        self._span(f, sink.hold, "sink holds its answers", sink.ok, "sink answers 200")

    def f_sink_slow(self, f, p):
        sink = self.env["sink"]
        self._span(f, lambda: sink.slow(p["delay"]), f"sink answers after {p['delay']}s",
                   sink.ok, "sink answers 200")

    def f_smtp_refuse(self, f, p):
        smtp = self.env["smtp"]
        self._span(f, smtp.refuse, "SMTP refuses (451)", smtp.accept, "SMTP accepts")

    # -- network
    def _partition(self, f, p, ports, peer):
        net, i, box = self.env["net"], p["replica"], {}
        self._span(f, lambda: box.update(handle=net.cut(i, ports, p["mode"])),
                   f"replica{i} cut off {peer} ({p['mode']})",
                   lambda: net.heal(box["handle"]), f"replica{i} reaches {peer} again")

    def f_partition_pg(self, f, p):
        self._partition(f, p, [self.env["pg"].port], "PostgreSQL")

    def f_partition_kafka(self, f, p):
        self._partition(f, p, self.env["kafka_ports"], "Kafka")


def fx_err(name):
    from soak import PRODUCE_ERRORS
    return PRODUCE_ERRORS[name]


def heal_everything(env):
    """After the schedule: whatever a fault thread left (an error mid-fault), undone.
    Returns the steps that failed."""
    pg, k = env["pg"], env["kafka"]
    steps = [env["net"].heal_all,
             lambda: fx.signal_pids(fx.pg_pids(pg), signal.SIGCONT),
             lambda: pg.running() or pg.start(),
             lambda: fx.pg_set_read_only(pg, False),
             lambda: k.signal(signal.SIGCONT), k.up, lambda: k.command("clear-errors"),
             env["sink"].ok, env["smtp"].accept]
    for r in env["replicas"]:
        steps.append(lambda r=r: r.signal(signal.SIGCONT))
        r.want = True
    errors = []
    for step in steps:
        try:
            step()
        except Exception as e:
            errors.append(repr(e))
    return errors


def record_senders(smtp):
    """smtp.accepted_log: every accepted mail with the sender's address (session.peer: a
    replica's veth address), which fake_smtp's own record does not keep."""
    orig = smtp.handler.handle_DATA
    smtp.accepted_log = []

    async def handle_DATA(server, session, envelope):
        answer = await orig(server, session, envelope)
        if answer.startswith("250"):
            smtp.accepted_log.append({"to": list(envelope.rcpt_tos), "time": time.time(),
                                      "peer": session.peer})
        return answer
    smtp.handler.handle_DATA = handle_DATA   # before the first session reads the hooks
    return smtp


def start_pg():
    """The harness's cluster, also on 127.0.0.1 (the replicas reach it over TCP, through
    their veth). free_port's port can be taken before PostgreSQL binds it: try another."""
    for attempt in range(5):
        try:
            return h.Pg(extra_conf={"listen_addresses": "127.0.0.1", "max_connections": "300"})
        except RuntimeError as e:
            if "Address already in use" not in str(e) or attempt == 4:
                raise
            log("soak: PostgreSQL's port was taken meanwhile, another one")


def run(a, schedule):
    rundir = tempfile.mkdtemp(prefix=f"ticketd-soak-{a.seed}-")
    log(f"soak: run directory {rundir} (replica logs, report.json)")
    try:
        net = fx.Net(a.replicas)
    except fx.SetupError as e:
        print(f"soak: SETUP FAILED: {e}", flush=True)
        return 2
    h._live.append(net)   # closed at exit, also by the harness watchdog
    log(f"soak: {net!r}, replicas at {[net.replica_ip(i) for i in range(a.replicas)]}")

    pg = start_pg()
    fx.pg_allow_tcp(pg, f"10.{net.net}.0.0/16")
    kafka = h.KafkaMock(a.partitions)
    kafka_ports = [int(b.rsplit(":", 1)[1]) for b in kafka.brokers.split(",")]
    sink = FakeSink()
    smtp = record_senders(FakeSmtp())
    h._live.append(sink)
    h._live.append(smtp)
    run_tag = f"{a.seed}"
    group = h.unique_group("soak")
    known = known_settings()
    env = {"DATABASE_URL": f"host=127.0.0.1 port={pg.port} user=postgres dbname=ticketd",
           "KAFKA_BROKERS": kafka.brokers, "ADMIN_TOKEN": h.ADMIN_TOKEN, "LOG_LEVEL": "info",
           "DATA_PLATFORM_URL": sink.url, "SMTP_URL": smtp.url, "CONSUMER_GROUP": group,
           "KAFKA_PARTITIONS": str(a.partitions), "RETRY_BACKOFF": "1s",
           "RETRY_MAX_ATTEMPTS": "15", "SINK_TIMEOUT": "2s", "RELAY_INTERVAL": "200ms",
           "SHUTDOWN_GRACE": "5s"}
    # Drain bound after a SIGKILL: a dead member's partitions wait for its session timeout.
    if "CONSUMER_SESSION_TIMEOUT" in known:
        env["CONSUMER_SESSION_TIMEOUT"] = "6s"
    else:
        env["KAFKA_CONFIG"] = "session.timeout.ms=6000,heartbeat.interval.ms=500"
    if "RELAY_LEASE_TTL" in known:   # a standby takes over within a leader's freeze
        env["RELAY_LEASE_TTL"] = "3s"
    if "SMTP_ALLOW_CLEARTEXT" in known:
        env["SMTP_ALLOW_CLEARTEXT"] = "true"
    settings_used = sorted(env)
    replicas = [Replica(i, net, env, rundir) for i in range(a.replicas)]
    if "CONSUMER_INSTANCE_ID" in known:   # static membership: a restart keeps its partitions
        for r in replicas:
            r.env["CONSUMER_INSTANCE_ID"] = f"soak-replica-{r.idx}"
        settings_used.append("CONSUMER_INSTANCE_ID")
    log(f"soak: replica settings: {', '.join(settings_used)}")

    # The first replica migrates the schema; then the others join.
    replicas[0].start()
    h.wait_until(replicas[0].healthy, timeout=90, what="replica0 /healthz")
    for r in replicas[1:]:
        r.start()
    for r in replicas:
        h.wait_until(r.healthy, timeout=90, what=f"replica{r.idx} /healthz")
    h.wait_until(lambda: sum(r.relay_active() for r in replicas) == 1, timeout=60,
                 what="one active relay")

    t0 = time.monotonic()
    sup = Supervisor(replicas, time.time(), kafka, rundir)
    sup.start()
    try:
        return _faults_and_check(a, schedule, rundir, world_of(pg, kafka, sink, smtp, net,
                                                              replicas, kafka_ports),
                                 sup, group, run_tag, t0)
    finally:
        sup.halt.set()   # before the harness closes the replicas at exit


def world_of(pg, kafka, sink, smtp, net, replicas, kafka_ports):
    return {"pg": pg, "kafka": kafka, "sink": sink, "smtp": smtp, "net": net,
            "replicas": replicas, "kafka_ports": kafka_ports}


def _faults_and_check(a, schedule, rundir, world, sup, group, run_tag, t0):
    replicas = world["replicas"]
    load = Load([(r.ip, r.port) for r in replicas], a.rate, a.seed, run_tag)
    load.start()
    ex = Executor(world, t0)
    ex.run(schedule)
    wait = t0 + a.duration - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    load.stop()
    heal_errors = heal_everything(world)
    t_healed = time.monotonic()
    log(f"soak: {t_healed - t0:.1f}s faults over, everything healed; load: {load.summary()}")
    if sup.kafka_died:
        print(f"soak: FAIL (seed {a.seed}): kafka-mock died during the run "
              f"({sup.kafka_died}); the topic was lost with it, nothing can be checked. "
              f"Logs: {rundir}", flush=True)
        return MOCK_DIED
    report = check.Checker(a, world, load, group, t_healed, ex.journal, sup.unexpected).run()
    if heal_errors:
        report["failures"].append({"stage": "heal", "what": f"healing failed: {heal_errors}",
                                   "count": 0, "ids": []})
    report["seed"] = a.seed
    report["schedule"] = schedule
    with open(os.path.join(rundir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    sup.halt.set()
    sup.join(timeout=5)
    shutil.copy(world["kafka"].logfile, os.path.join(rundir, "kafka-mock.log"))
    for r in replicas:
        r.want = False
        r.archive()
    passed = not report["failures"]
    print(check.render(report), flush=True)
    print(f"soak: {'PASS' if passed else 'FAIL'} (seed {a.seed}); report {rundir}/report.json",
          flush=True)
    if passed and not a.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return 0 if passed else 1

