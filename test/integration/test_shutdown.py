"""SIGTERM under load loses nothing (a rolling update in Kubernetes).

Clients post applications continuously. The applications table is locked from a psql
session so that a known set of requests is certainly in flight (their group commit is
waiting in PostgreSQL) when SIGTERM arrives. Then:
  - /readyz stops answering 200 at once, while those requests are still unanswered
    (readiness turns false first, then the drain);
  - once the lock is released, every in-flight request is answered;
  - the process exits 0 within SHUTDOWN_GRACE;
  - every 201 a client received has its application row and its outbox row; no request
    that went unanswered (or got 503) has a row;
  - the relay's producer was flushed: every outbox row marked published is in the topic
    at its partition and offset (read with kcat), and every message in the topic belongs
    to a row marked published; after a restart the rest is published, so every 201 is in
    the topic.
The relay part needs src/outbox_relay.c; before the relay exists it is asserted only if
rows were published, and said so on stderr.
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SHUTDOWN_GRACE_S = 15
EVENT = "shutdown-2026"
LOADERS = 4
IN_FLIGHT = 6
TOPIC = "ticket-applied"


def post_application(port, phone, timeout=60):
    """One POST on a fresh connection. Returns a dict: outcome is 'refused' (never
    connected: not sent), 'send_failed', 'no_response' (sent, connection closed without
    an answer) or 'answered' (with status and id)."""
    rec = {"phone": phone, "sent_at": None, "done_at": None, "status": None, "id": None}
    body = json.dumps({"event_id": EVENT, "phone": phone, "name": "Shutdown Test"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError:
            rec["outcome"] = "refused"
            return rec
        rec["sent_at"] = time.monotonic()
        try:
            conn.request("POST", "/v1/applications", body=body,
                         headers={"Content-Type": "application/json"})
        except OSError:
            rec["outcome"] = "send_failed"
            return rec
        try:
            r = conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            rec["outcome"] = "no_response"
            rec["done_at"] = time.monotonic()
            return rec
        rec["done_at"] = time.monotonic()
        rec["outcome"] = "answered"
        rec["status"] = r.status
        if r.status == 201:
            rec["reference"] = json.loads(data)["reference"]
        return rec
    finally:
        conn.close()


class Loader(threading.Thread):
    """Posts applications with distinct phones until told to stop or the server is gone."""

    def __init__(self, port, base, stop, deadline):
        super().__init__(daemon=True)
        self.port, self.base, self.stop, self.deadline = port, base, stop, deadline
        self.results = []

    def run(self):
        i, refused = 0, 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            rec = post_application(self.port, harness.phone_for(self.base + i))
            i += 1
            self.results.append(rec)
            if rec["outcome"] == "refused":
                refused += 1
                if refused >= 3:
                    return
                time.sleep(0.05)


class TableLock:
    """Holds LOCK TABLE applications IN SHARE MODE in a psql session until released:
    inserts wait, reads do not."""

    def __init__(self, pg):
        self.pg = pg
        self.proc = subprocess.Popen(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", pg.dir, "-p", str(pg.port),
             "-U", "postgres", "-d", "ticketd"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=harness._die_with_parent)
        self.proc.stdin.write("BEGIN;\nLOCK TABLE applications IN SHARE MODE;\n")
        self.proc.stdin.flush()
        harness.wait_until(lambda: pg.scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'applications' AND l.mode = 'ShareLock' AND l.granted") == "1",
            timeout=30, what="the share lock on applications")

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("COMMIT;\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def probe_readyz(port, conn):
    """GET /readyz on the kept-alive conn, else on a fresh connection. Returns the status,
    or 'refused'/'closed' when no answer was possible."""
    for c in (conn, None):
        fresh = c is None
        if fresh:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            c.request("GET", "/readyz")
            r = c.getresponse()
            r.read()
            return r.status
        except ConnectionRefusedError:
            return "refused"
        except (OSError, http.client.HTTPException):
            if fresh:
                return "closed"
        finally:
            if fresh:
                c.close()
    return "closed"


class ShutdownUnderLoad(harness.TicketdTestCase):

    def test_sigterm_under_load_loses_nothing(self):
        relay_built = os.path.exists(os.path.join(harness.SOURCE_DIR, "src", "outbox_relay.c"))
        mock = self.track(harness.KafkaMock(partitions=4))
        t = self.track(harness.Ticketd(self.pg, brokers=mock.brokers, env={
            "SHUTDOWN_GRACE": f"{SHUTDOWN_GRACE_S}s", "DB_POOL": "2",
            "CONSUMER_GROUP": harness.unique_group("shutdown")}))

        # A kept-alive connection for readiness probes, opened while the server accepts.
        probe_conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=5)
        self.addCleanup(probe_conn.close)
        probe_conn.request("GET", "/readyz")
        first = probe_conn.getresponse()
        first.read()
        self.assertEqual(first.status, 200)

        stop = threading.Event()
        deadline = time.monotonic() + 120
        loaders = [Loader(t.port, 1_000_000 * (k + 1), stop, deadline) for k in range(LOADERS)]
        for ld in loaders:
            ld.start()
        self.addCleanup(stop.set)
        harness.wait_until(lambda: sum(1 for ld in loaders for r in ld.results
                                       if r["status"] == 201) >= 20,
                           timeout=60, what="some 201s under load")

        # Make a known set of requests be in flight: their commit waits for the lock.
        lock = TableLock(self.pg)
        self.addCleanup(lock.close)
        in_flight = []
        threads = []
        for k in range(IN_FLIGHT):
            def send(k=k):
                in_flight.append(post_application(t.port, harness.phone_for(9_000_000 + k)))
            th = threading.Thread(target=send, daemon=True)
            th.start()
            threads.append(th)
        harness.wait_until(lambda: int(self.pg.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'ticketd' "
            "AND wait_event_type = 'Lock'")) >= 1, timeout=30,
            what="a group commit waiting for the lock")
        time.sleep(0.5)  # let the server read the in-flight requests too

        sigterm_at = time.monotonic()
        t.signal(signal.SIGTERM)
        time.sleep(0.3)  # the loop handles the signal; it is not blocked on the DB

        # Readiness first: not 200 while the in-flight requests still wait for the DB.
        probes = []
        while time.monotonic() < sigterm_at + 5:
            probes.append(probe_readyz(t.port, probe_conn))
            if probes[-1] != 200:
                break
            time.sleep(0.1)
        print(f"readyz after SIGTERM: {probes}", file=sys.stderr)
        self.assertNotIn(200, probes, "/readyz still 200 after SIGTERM")

        # The drain waits for them: a second later the process still runs, nothing answered.
        time.sleep(1.0)
        self.assertTrue(t.alive(), "ticketd exited while requests were in flight")
        self.assertEqual(in_flight, [], "in-flight requests answered while their commit waits")
        lock.release()
        for th in threads:
            th.join(timeout=60)
        self.assertEqual(len(in_flight), IN_FLIGHT)
        try:
            rc = t.proc.wait(timeout=SHUTDOWN_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.fail(f"ticketd still running {SHUTDOWN_GRACE_S + 5}s after SIGTERM")
        exited_at = time.monotonic()
        print(f"exited {exited_at - sigterm_at:.2f}s after SIGTERM with {rc}", file=sys.stderr)
        self.assertEqual(rc, 0, "graceful shutdown must exit 0")

        stop.set()
        for ld in loaders:
            ld.join(timeout=90)
            self.assertFalse(ld.is_alive())
        results = [r for ld in loaders for r in ld.results] + in_flight
        by_outcome = {}
        for r in results:
            key = r["outcome"] if r["outcome"] != "answered" else r["status"]
            by_outcome[key] = by_outcome.get(key, 0) + 1
        print(f"client outcomes: {by_outcome}", file=sys.stderr)

        # Every request that was in flight at SIGTERM was answered, some with 201.
        was_in_flight = [r for r in results if r["sent_at"] and r["sent_at"] < sigterm_at
                         and (r["done_at"] is None or r["done_at"] > sigterm_at)]
        self.assertGreaterEqual(len(was_in_flight), IN_FLIGHT)
        unanswered = [r for r in was_in_flight if r["outcome"] != "answered"]
        self.assertEqual(unanswered, [], "requests in flight at SIGTERM were not answered")
        self.assertTrue(any(r["status"] == 201 for r in was_in_flight),
                        "the commit waiting at SIGTERM was not answered with 201")
        self.assertEqual({r["status"] for r in results if r["outcome"] == "answered"} -
                         {201, 503}, set(), "unexpected statuses")

        # 201 => application row and outbox row.
        by_ref = dict(self.pg.query("SELECT reference, id FROM applications"))
        ok = {int(by_ref.get(r["reference"], 0)): r["phone"] for r in results if r["status"] == 201}  # 0: no row
        rows = {int(i): p for i, p in self.pg.query(
            f"SELECT id, phone FROM applications WHERE event_id = '{EVENT}'")}
        outbox = {int(a) for (a,) in self.pg.query("SELECT aggregate_id FROM outbox")}
        missing_app = [i for i in ok if i not in rows]
        missing_outbox = [i for i in ok if i not in outbox]
        self.assertEqual(missing_app, [], "201 without an application row")
        self.assertEqual(missing_outbox, [], "201 without an outbox row")
        for i, phone in ok.items():
            self.assertEqual(rows[i], phone.replace("-", ""))
        # No row for a request whose answer was lost or was 503: nothing committed unanswered.
        stored_phones = set(rows.values())
        silent = [r["phone"] for r in results
                  if (r["outcome"] in ("no_response", "send_failed") or r["status"] == 503)
                  and r["phone"].replace("-", "") in stored_phones]
        self.assertEqual(silent, [], "committed but answered 503 or not at all")
        self.assertEqual(len(rows), len(ok), "rows without a 201")

        self.check_relay(mock, ok, relay_built)

    def check_relay(self, mock, ok, relay_built):
        published = self.pg.query("SELECT event_id, kafka_partition, kafka_offset FROM outbox_status "
                                  "WHERE published_at IS NOT NULL")
        if not relay_built and not published:
            print("test_shutdown: no relay built (src/outbox_relay.c) and no row published: "
                  "the producer-flush checks were not run", file=sys.stderr)
            return
        self.assertTrue(published, "the relay published nothing before shutdown")
        msgs = harness.kcat_consume(mock.brokers, TOPIC, expect=len(published), timeout=60)
        at = {(m["partition"], m["offset"]): m["headers"].get("ce_id") for m in msgs}
        wrong = [(e, p, o, at.get((int(p), int(o)))) for e, p, o in published
                 if at.get((int(p), int(o))) != e]
        self.assertEqual(wrong, [], "published rows not at their partition/offset in the topic")
        marked = {e for e, _, _ in published}
        unmarked = sorted({m["headers"].get("ce_id") for m in msgs} - marked)
        self.assertEqual(unmarked, [], "acknowledged messages whose rows were not marked "
                                       "published before exit: the producer was not flushed")

        # A new process publishes the rest: every 201 reaches the topic.
        t2 = self.track(harness.Ticketd(self.pg, brokers=mock.brokers, role="api,relay",
                                        name="ticketd-2"))
        harness.wait_until(lambda: self.pg.count("outbox_status WHERE published_at IS NULL") == 0,
                           timeout=90, what="the restarted relay to publish every row")
        events = {int(a): e for a, e in self.pg.query("SELECT aggregate_id, event_id FROM outbox")}
        msgs = harness.kcat_consume(mock.brokers, TOPIC, expect=len(events), timeout=60)
        in_topic = {m["headers"].get("ce_id") for m in msgs}
        lost = [i for i in ok if events[i] not in in_topic]
        self.assertEqual(lost, [], "201s whose event never reached the topic")
        self.assertEqual(t2.terminate(timeout=60), 0)


if __name__ == "__main__":
    unittest.main()
