"""Integration test harness for ticketd (Python 3 stdlib only).

What it gives a test:
  Pg()              a throwaway PostgreSQL 15 cluster (initdb into a temp dir; run as the
                    `postgres` user when root; unix socket in that dir), database `ticketd`.
                    .url (libpq conninfo), .query(sql) -> rows, .scalar(sql), .execute(sql),
                    .stop(), .start(), .restart(), .close()
  KafkaMock(n)      `ticketd kafka-mock` (librdkafka's mock cluster, 3 brokers) with topics of
                    n partitions. .brokers, .down([broker]), .up([broker]), .close()
  Ticketd(pg, ...)  `ticketd serve` on a free loopback port. .request(), .apply(),
                    .metrics(), .kill(), .terminate(), .log_text(), .close()
  kcat_consume(), kcat_produce()   the independent Kafka client
  wait_until(), free_port(), unique_group(), raw_exchange(), parallel()
  TicketdTestCase   unittest base class that stops everything it started, by pid.

Every process started here is stopped by pid at close() / tearDown / interpreter exit, and
children of the test die with it (PR_SET_PDEATHSIG). Logs of ticketd and kafka-mock are
printed (tail) to stderr when they are closed, so `ctest --output-on-failure` shows them.
Set TICKETD_KEEP=1 to keep temp dirs.
"""
import atexit
import ctypes
import http.client
import json as jsonlib
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("TICKETD_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))
BIN = os.environ.get("TICKETD_BIN", os.path.join(SOURCE_DIR, "build", "ticketd"))
PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
ADMIN_TOKEN = "test-admin-token-0123456789"
IS_ROOT = os.geteuid() == 0

_live = []  # objects with .close(), closed at exit in reverse order


class HarnessError(RuntimeError):
    """A throwaway service could not be started or used (the benches' BenchError too)."""


def _cleanup_all():
    for obj in reversed(list(_live)):
        try:
            obj.close()
        except Exception as e:  # keep closing the others
            print(f"harness: cleanup of {obj!r} failed: {e}", file=sys.stderr)


atexit.register(_cleanup_all)


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL when the test process dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text):
    """{'name{labels}': float} from a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            pass
    return out


def unique_group(prefix="test-group"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(pred, timeout=30.0, interval=0.1, what="condition"):
    """Calls pred() until it returns a truthy value (returned) or timeout seconds pass
    (AssertionError naming `what` and the last value)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except Exception as e:  # a pred may fail while a service comes up
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def tail(path, n=40):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


_tail = tail


def as_postgres(argv):
    """argv run as the postgres user when we are root (PostgreSQL refuses to run as root)."""
    return (["runuser", "-u", "postgres", "--"] + argv) if IS_ROOT else argv


def _run_as_postgres(argv, **kw):
    return subprocess.run(as_postgres(argv), **kw)


# --------------------------------------------------------------------------- PostgreSQL

class Pg:
    """A throwaway PostgreSQL 15 cluster with database `ticketd`. Started on construction.

    The tests' and the benches' one cluster. workdir: put it in workdir/pg (else a new temp
    dir); settings: replace the default server settings (extra_conf adds to them); tcp: also
    listen on 127.0.0.1 and connect through it (url); stop_mode: how close() stops it."""

    NULL = "\x1dNULL\x1d"
    DEFAULT_SETTINGS = {"max_connections": "200", "fsync": "on", "shared_buffers": "128MB"}

    def __init__(self, extra_conf=None, workdir=None, settings=None, tcp=False,
                 stop_mode="immediate"):
        if workdir:
            self.dir = os.path.join(workdir, "pg")
            os.mkdir(self.dir)
        else:
            self.dir = tempfile.mkdtemp(prefix="ticketd-pg-")
        os.chmod(self.dir, 0o755)
        if IS_ROOT:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.logfile = os.path.join(self.dir, "postgres.log")
        self.settings = dict(self.DEFAULT_SETTINGS if settings is None else settings)
        self.extra_conf = extra_conf or {}
        self.tcp = tcp
        self.stop_mode = stop_mode
        r = _run_as_postgres([f"{PGBIN}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                              "-E", "UTF8", "--no-locale"], capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"initdb failed: {r.stderr}")
        _live.append(self)
        self.start()
        self.execute("CREATE DATABASE ticketd", db="postgres")
        host = "127.0.0.1" if tcp else self.dir
        self.url = f"host={host} port={self.port} user=postgres dbname=ticketd"

    def __repr__(self):
        return f"Pg({self.dir})"

    def _opts(self):
        conf = dict(self.settings, listen_addresses="127.0.0.1" if self.tcp else "''",
                    unix_socket_directories=self.dir, port=str(self.port))
        conf.update({k: str(v) for k, v in self.extra_conf.items()})
        return " ".join(f"-c {k}={v}" for k, v in conf.items())

    def start(self):
        r = _run_as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-o", self._opts(), "-l",
                              self.logfile, "-w", "-t", "60", "start"], capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"pg_ctl start failed: {r.stdout}{r.stderr}\n{_tail(self.logfile)}")
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def stop(self, mode="fast"):
        _run_as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"],
                         capture_output=True, text=True)

    def restart(self):
        self.stop()
        self.start()

    def running(self):
        r = _run_as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "status"], capture_output=True)
        return r.returncode == 0

    def psql(self, sql, db="ticketd", check=True):
        """Runs sql with psql; returns the CompletedProcess (text)."""
        argv = ["psql", "-X", "-q", "-A", "-t", "-F", "\x1f", "-R", "\x1e", "-P", f"null={self.NULL}",
                "-v", "ON_ERROR_STOP=1", "-h", self.dir, "-p", str(self.port), "-U", "postgres",
                "-d", db, "-c", sql]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise HarnessError(f"psql failed ({r.returncode}): {r.stderr.strip()}\nSQL: {sql}")
        return r

    def rows(self, *sql, db="ticketd", timeout=300):
        """Runs the statements (one psql session, one -c each); returns the rows of the last
        result as lists of strings ("|"-separated output, SQL NULL as "")."""
        argv = ["psql", "-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-h", self.dir,
                "-p", str(self.port), "-U", "postgres", "-d", db]
        for s in sql:
            argv += ["-c", s]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise HarnessError(f"psql failed: {r.stderr.strip()}\nSQL: {sql[-1][:300]}")
        return [line.split("|") for line in r.stdout.splitlines() if line != ""]

    def query(self, sql, db="ticketd"):
        """Rows as lists of strings; SQL NULL is None."""
        out = self.psql(sql, db=db).stdout
        rows = []
        for rec in out.split("\x1e"):
            rec = rec.strip("\n")
            if rec == "":
                continue
            rows.append([None if v == self.NULL else v for v in rec.split("\x1f")])
        return rows

    def scalar(self, sql, db="ticketd"):
        rows = self.query(sql, db=db)
        return rows[0][0] if rows else None

    def count(self, sql_from_where):
        """count("applications WHERE event_id='e'") -> int"""
        return int(self.scalar(f"SELECT count(*) FROM {sql_from_where}"))

    def execute(self, sql, db="ticketd"):
        self.psql(sql, db=db)

    def unfinished_events(self):
        """Outbox rows whose event is neither dead-lettered nor processed with every effect
        done (processed_events gets its row with the points, before the other effects)."""
        return self.count(
            "outbox o WHERE NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id)"
            " AND NOT (EXISTS (SELECT 1 FROM processed_events p WHERE p.event_id = o.event_id)"
            " AND NOT EXISTS (SELECT 1 FROM event_effects e WHERE e.event_id = o.event_id"
            " AND NOT e.done))")

    def application_id(self, body):
        """The internal applications.id behind a 201 body: its "id" where the answer still
        carries one, else looked up by its unguessable "reference" (issue 12)."""
        if "id" in body:
            return int(body["id"])
        ref = str(body["reference"])
        if not re.fullmatch(r"[0-9a-fA-F-]{36}", ref):
            raise ValueError(f"not a reference: {ref!r}")
        v = self.scalar(f"SELECT id FROM applications WHERE reference = '{ref}'")
        return int(v) if v is not None else None

    def close(self):
        if self in _live:
            _live.remove(self)
        if os.path.exists(self.data):
            self.stop(mode=self.stop_mode)
        if not os.environ.get("TICKETD_KEEP") and not os.environ.get("RUSH_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- processes

class Proc:
    """A child process whose stdout+stderr go to a log file (logfile, else one in a new temp
    dir), stopped by pid. echo_log: close() prints the log's last lines (tests do, benches
    keep their output to themselves)."""

    def __init__(self, argv, env, name, stdin=None, stdout_pipe=False, logfile=None,
                 echo_log=True):
        self.name = name
        self.echo_log = echo_log
        self.dir = None if logfile else tempfile.mkdtemp(prefix=f"ticketd-{name}-")
        self.logfile = logfile or os.path.join(self.dir, f"{name}.log")
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdin=stdin,
                                     stdout=subprocess.PIPE if stdout_pipe else self._log,
                                     stderr=self._log, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        _live.append(self)

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self):
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout=30):
        """SIGTERM; returns the exit code (SIGKILL after timeout, then AssertionError)."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM")

    def read_line(self, prefix, timeout):
        """The rest of the first stdout line starting with prefix (a child announcing its
        address); stdout_pipe=True."""
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.decode("utf-8", "replace").splitlines():
                    if line.startswith(prefix):
                        return line[len(prefix):].strip()
            elif not self.alive():
                break
        raise HarnessError(f"{self.name} did not print {prefix!r}:\n{_tail(self.logfile)}")

    def stop(self, timeout=30):
        """Closes stdin, SIGTERM, waits, then SIGKILL; returns the exit code."""
        self._end(timeout)
        rc = self.proc.returncode
        self.close()
        return rc

    def _end(self, timeout):
        if not self.alive():
            return
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self):
        self._log.flush()
        with open(self.logfile, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close(self):
        if self in _live:
            _live.remove(self)
        if self.alive():
            self.kill()
        if self._log.closed:
            return
        self._log.close()
        tail = _tail(self.logfile) if self.echo_log else ""
        if tail:
            print(f"---- last lines of {self.name} (pid {self.pid}) log {self.logfile} ----\n{tail}",
                  file=sys.stderr)
        if self.dir and not os.environ.get("TICKETD_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


_Proc = Proc  # the tests' name for it


class KafkaMock(Proc):
    """`ticketd kafka-mock`: the mock cluster in its own process, shared by ticketd processes
    and kcat. Commands on its stdin: down/up [broker]. bin, logfile, echo_log: for the
    benches (their own build, their run directory, quiet)."""

    def __init__(self, partitions=4, env=None, bin=None, logfile=None, echo_log=True):
        e = dict(os.environ)
        e.update({"KAFKA_PARTITIONS": str(partitions), "LOG_LEVEL": "info"})
        e.update(env or {})
        super().__init__([bin or BIN, "kafka-mock"], e, "kafka-mock", stdin=subprocess.PIPE,
                         stdout_pipe=True, logfile=logfile, echo_log=echo_log)
        self.partitions = partitions
        self._lines = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        line = self._next_line(30)
        if not line.startswith("bootstrap="):
            raise RuntimeError(f"kafka-mock printed {line!r}\n{self.log_text()}")
        self.brokers = line.split("=", 1)[1].strip()

    def _reader(self):
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def _next_line(self, timeout):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("kafka-mock did not answer in time")
        if line is None:
            raise AssertionError(f"kafka-mock exited:\n{self.log_text()}")
        return line

    def command(self, cmd):
        self.proc.stdin.write((cmd + "\n").encode())
        self.proc.stdin.flush()
        answer = self._next_line(10)
        if answer != "ok":
            raise AssertionError(f"kafka-mock answered {answer!r} to {cmd!r}")

    def down(self, broker=None):
        """All brokers down (or one, by id 1..3)."""
        self.command("down" if broker is None else f"down {broker}")

    def up(self, broker=None):
        self.command("up" if broker is None else f"up {broker}")

    def close(self):
        try:
            self._end(10)
        except subprocess.TimeoutExpired:  # SIGKILLed and still not reaped: close() reports it
            pass
        super().close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe:
                    pipe.close()
            except OSError:
                pass


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body

    def json(self):
        return jsonlib.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return f"Response({self.status}, {self.body[:200]!r})"


def http_request(port, method, path, body=None, json=None, headers=None, timeout=15,
                 host="127.0.0.1"):
    """One request on a fresh connection. json= sets the body and Content-Type."""
    hdrs = dict(headers or {})
    if json is not None:
        body = jsonlib.dumps(json).encode("utf-8")
        hdrs.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode("utf-8")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def raw_exchange(port, data, timeout=5.0, host="127.0.0.1"):
    """Sends raw bytes, returns everything read until the server closes or timeout."""
    chunks = []
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        s.settimeout(timeout)
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except socket.timeout:
            pass
    return b"".join(chunks)


def parse_responses(data):
    """Splits raw bytes read from one connection into [Response] (Content-Length or chunked
    bodies; a response without either ends at the end of data). Raises ValueError on bytes
    that are not a well-formed HTTP/1.1 response, so a test sees garbage as a failure."""
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ValueError(f"incomplete response head at byte {pos}: {data[pos:pos + 200]!r}")
        lines = data[pos:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if "content-length" in headers:
            n = int(headers["content-length"])
            if pos + n > len(data):
                raise ValueError(f"body shorter than Content-Length {n}")
            body, pos = data[pos:pos + n], pos + n
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    raise ValueError("incomplete chunk size line")
                size = int(data[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                if size == 0:
                    trailer_end = data.find(b"\r\n", pos)
                    if trailer_end < 0:
                        raise ValueError("incomplete chunked trailer")
                    pos = trailer_end + 2
                    break
                body += data[pos:pos + size]
                pos += size + 2
        else:
            body, pos = data[pos:], len(data)
        out.append(Response(int(parts[1]), headers, body))
    return out


def read_response(sock, timeout=15.0):
    """Reads exactly one HTTP response (Content-Length body) from a connected socket;
    returns Response, or None if the server closed the connection before sending one."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = sock.recv(65536)
        if not b:
            if buf:
                raise ValueError(f"connection closed inside a response head: {buf[:200]!r}")
            return None
        buf += b
    head_len = buf.index(b"\r\n\r\n") + 4
    length = 0
    for line in buf[:head_len].decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(buf) < head_len + length:
        b = sock.recv(65536)
        if not b:
            raise ValueError("connection closed inside a response body")
        buf += b
    if len(buf) > head_len + length:
        raise ValueError(f"unexpected bytes after the response: {buf[head_len + length:][:200]!r}")
    return parse_responses(buf)[0]


def parallel(fn, items, workers=32):
    """[fn(x) for x in items] on a thread pool, results in order."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))


def phone_for(i):
    """A distinct valid Korean mobile number for each i < 10^8: 010-NNNN-NNNN."""
    n = i % 100_000_000
    return f"010-{n // 10000:04d}-{n % 10000:04d}"


class Ticketd(_Proc):
    """`ticketd serve` on 127.0.0.1:<free port> against pg (and brokers, or the in-process
    mock when brokers is ""). Waits for /healthz (and /readyz when ready=True)."""

    def __init__(self, pg, brokers="", env=None, args=None, ready=True, role=None,
                 start_timeout=60, name="ticketd", port=None):
        self.port = port or free_port()  # a given port: a replacement behind a balancer
        e = dict(os.environ)
        e.update({"DATABASE_URL": pg.url if pg is not None else "", "KAFKA_BROKERS": brokers,
                  "LISTEN": f"127.0.0.1:{self.port}", "ADMIN_TOKEN": ADMIN_TOKEN,
                  "LOG_LEVEL": "info"})
        if role:
            e["ROLE"] = role
        e.update({k: str(v) for k, v in (env or {}).items()})
        super().__init__([BIN, "serve"] + list(args or []), e, name)
        self.pg = pg
        wait_until(lambda: self._probe("/healthz"), timeout=start_timeout,
                   what=f"{name} /healthz\n{_tail(self.logfile)}")
        if ready:
            self.wait_ready(start_timeout)

    def _probe(self, path):
        if not self.alive():
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.request("GET", path, timeout=2).status == 200
        except OSError:
            return False

    def wait_ready(self, timeout=60):
        wait_until(lambda: self._probe("/readyz"), timeout=timeout,
                   what=f"{self.name} /readyz\n{_tail(self.logfile)}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, json=None, headers=None, timeout=15):
        return http_request(self.port, method, path, body=body, json=json, headers=headers,
                            timeout=timeout)

    def admin(self, method, path, json=None, token=ADMIN_TOKEN):
        h = {"Authorization": f"Bearer {token}"} if token else {}
        return self.request(method, path, json=json, headers=h)

    def apply(self, event_id="concert-2026", phone="010-1234-5678", name="Kim Minji",
              email=None, seats=None, idempotency_key=None, timeout=15):
        """POST /v1/applications with a valid body; returns the Response."""
        body = {"event_id": event_id, "phone": phone, "name": name}
        if email is not None:
            body["email"] = email
        if seats is not None:
            body["seats"] = seats
        h = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/applications", json=body, headers=h, timeout=timeout)

    def metrics(self):
        """{'name{labels}': float} from /metrics."""
        return parse_metrics(self.request("GET", "/metrics").body.decode())


def publication_record_sql(where, partition, offset="o.id", published_at="now()"):
    """SQL recording the outbox rows o matching `where` published as the relay records them:
    one outbox_publications row (partition, the ids and their offsets; offset is an SQL
    expression of o). Nothing is inserted when no row matches."""
    return ("INSERT INTO outbox_publications (kafka_partition, ids, offsets, first_id, last_id,"
            " epoch, published_at)"
            f" SELECT {partition}, array_agg(o.id ORDER BY o.id),"
            f" array_agg(({offset})::bigint ORDER BY o.id), min(o.id), max(o.id), 0, {published_at}"
            f" FROM outbox o WHERE {where} HAVING count(*) > 0")


# --------------------------------------------------------------------------- kcat

def _kcat_base(brokers):
    return ["kcat", "-b", brokers, "-X", "topic.metadata.refresh.interval.ms=1000"]


def kcat_consume(brokers, topic, expect=None, timeout=60, partition=None):
    """Reads the whole topic (from the beginning to the end) with kcat, an independent client.
    Returns [{'partition','offset','key','value','headers':{...},'timestamp'}] sorted by
    (partition, offset). With expect=N, retries until at least N messages are read."""
    def once():
        argv = _kcat_base(brokers) + ["-C", "-t", topic, "-e", "-J", "-q", "-o", "beginning"]
        if partition is not None:
            argv += ["-p", str(partition)]
        r = subprocess.run(argv, capture_output=True, timeout=120)
        msgs = []
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            m = jsonlib.loads(line)
            h = m.get("headers") or []
            headers = {h[i]: h[i + 1] for i in range(0, len(h) - 1, 2)}
            msgs.append({"partition": m["partition"], "offset": m["offset"], "key": m.get("key"),
                         "value": m.get("payload"), "headers": headers, "timestamp": m.get("ts")})
        msgs.sort(key=lambda x: (x["partition"], x["offset"]))
        return msgs, r

    if expect is None:
        return once()[0]
    box = {}

    def enough():
        box["msgs"], box["r"] = once()
        return len(box["msgs"]) >= expect

    wait_until(enough, timeout=timeout, interval=0.5,
               what=f"{expect} messages in {topic} (got {len(box.get('msgs') or [])})")
    return box["msgs"]


def kcat_produce(brokers, topic, value, key=None, headers=None, partition=None):
    """Produces one message (value: str or bytes) with kcat."""
    argv = _kcat_base(brokers) + ["-P", "-t", topic, "-Z"]
    if key is not None:
        argv += ["-k", str(key)]
    if partition is not None:
        argv += ["-p", str(partition)]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}={v}"]
    if isinstance(value, str):
        value = value.encode("utf-8")
    r = subprocess.run(argv, input=value, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"kcat produce failed: {r.stderr.decode()}")


def run_ticketd(args, env=None, timeout=120, input=None):
    """Runs a ticketd CLI command (migrate, audit, trace, dlq ...) to completion."""
    e = dict(os.environ)
    e.update({k: str(v) for k, v in (env or {}).items()})
    return subprocess.run([BIN] + list(args), env=e, capture_output=True, text=True,
                          timeout=timeout, input=input)


# --------------------------------------------------------------------------- unittest

class TicketdTestCase(unittest.TestCase):
    """Base class: self.pg is a fresh cluster per test class; self.track(obj) closes obj at
    the end of the test (processes by pid). A watchdog ends a hung file after 540 s."""

    pg = None

    @classmethod
    def setUpClass(cls):
        cls.pg = Pg()

    @classmethod
    def tearDownClass(cls):
        if cls.pg:
            cls.pg.close()

    def track(self, obj):
        self.addCleanup(obj.close)
        return obj

    def reset_db(self):
        """Empties every table of the service (keeps the schema)."""
        tables = [r[0] for r in self.pg.query(
            "SELECT tablename FROM pg_tables WHERE schemaname='public' AND tablename <> 'schema_migrations'")]
        if tables:
            self.pg.execute("TRUNCATE " + ", ".join(tables) + " RESTART IDENTITY")


class ApiTestCase(TicketdTestCase):
    """One ticketd (ROLE=api) shared by the class's tests, on the class's PostgreSQL: cls.td."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.td = Ticketd(cls.pg, role="api")

    @classmethod
    def tearDownClass(cls):
        cls.td.close()
        super().tearDownClass()


def _watchdog(seconds=540):
    def fire():
        print(f"harness: watchdog: test file still running after {seconds}s, stopping",
              file=sys.stderr)
        _cleanup_all()
        os._exit(3)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


_watchdog(int(os.environ.get("TICKETD_TEST_WATCHDOG", "540")))


def application_ids(pg, bodies):
    """{k: applications.id} for many 201 bodies {k: body} (Pg.application_id's mapping; the
    references of issue 12 are looked up in one query)."""
    out = {k: pg.application_id(b) for k, b in bodies.items() if "id" in b}
    refs = {str(b["reference"]): k for k, b in bodies.items() if "id" not in b}
    if refs:
        got = dict(pg.query("SELECT reference::text, id FROM applications WHERE reference IS NOT NULL"))
        out.update({k: int(got[r]) if r in got else None for r, k in refs.items()})
    return out
