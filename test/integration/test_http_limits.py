"""Issue 2: the HTTP layer's limits and edge cases through the real binary (small limits set
through the environment), each followed by a normal request that must still succeed."""
import json
import select
import socket
import subprocess
import threading
import time
import unittest
import uuid

from harness import (Ticketd, TicketdTestCase, parse_responses, phone_for, raw_exchange,
                     read_response, wait_until)

MAX_BODY = 1024
MAX_HEADER_BYTES = 1024
MAX_HEADERS = 16
IDLE_TIMEOUT_S = 1
HEADER_TIMEOUT_S = 2
# Bounded waits for "the server closes": far above the configured timeouts, so a slow
# (sanitizer) build passes, while a server that never closes fails.
CLOSE_WAIT_S = 15


def new_event():
    return f"http-{uuid.uuid4().hex[:16]}"


def post_bytes(body, extra=b"", close=False):
    return (b"POST /v1/applications HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + extra + (b"Connection: close\r\n" if close else b"")
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def get_bytes(path, close=False):
    return (f"GET {path} HTTP/1.1\r\nHost: t\r\n".encode()
            + (b"Connection: close\r\n" if close else b"") + b"\r\n")


def chunked(pieces):
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


def wait_closed(sock, timeout, trickle=None, every=0.25):
    """Waits until the server closes sock; sends one trickle byte per `every` s meanwhile if
    given. Returns (closed, bytes received before the close)."""
    got = b""
    deadline = time.monotonic() + timeout
    i = 0
    while time.monotonic() < deadline:
        if trickle is not None:
            try:
                sock.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True, got
            i += 1
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                b = sock.recv(65536)
            except ConnectionResetError:
                return True, got
            if not b:
                return True, got
            got += b
    return False, got


class HttpLimitsTest(TicketdTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.td = Ticketd(cls.pg, role="api", env={
            "MAX_BODY_BYTES": MAX_BODY, "MAX_HEADER_BYTES": MAX_HEADER_BYTES,
            "MAX_HEADERS": MAX_HEADERS, "IDLE_TIMEOUT": f"{IDLE_TIMEOUT_S}s",
            "HEADER_TIMEOUT": f"{HEADER_TIMEOUT_S}s"})

    @classmethod
    def tearDownClass(cls):
        cls.td.close()
        super().tearDownClass()

    def setUp(self):
        self.ev = new_event()
        self.n = 0

    def body(self, **extra):
        """A valid application body of this test's event with a fresh phone."""
        self.n += 1
        b = {"event_id": self.ev, "phone": phone_for(self.n), "name": f"Limit {self.n}"}
        b.update(extra)
        return json.dumps(b).encode()

    def rows(self):
        return self.pg.count(f"applications WHERE event_id = '{self.ev}'")

    def phone_of(self, app_id):
        return self.pg.scalar(f"SELECT phone FROM applications WHERE id = {int(app_id)}")

    def assert_serving(self, td=None):
        """The service still answers a normal application with 201 and a row."""
        td = td or self.td
        before = self.rows()
        r = td.request("POST", "/v1/applications", body=self.body(),
                       headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(self.rows(), before + 1)

    def first_status(self, data):
        """Status of the first response in data (connection may close right after)."""
        self.assertTrue(data.startswith(b"HTTP/1.1 "), f"no HTTP response: {data[:200]!r}")
        return int(data[9:12])

    # ---------------------------------------------------------------- pipelining, splits

    def test_pipelined_requests_answered_in_order(self):
        post = self.body()
        data = raw_exchange(self.td.port, get_bytes("/healthz") + post_bytes(post)
                            + get_bytes("/no-such-path", close=True), timeout=10)
        rs = parse_responses(data)
        self.assertEqual([r.status for r in rs], [200, 201, 404], data[:600])
        self.assertEqual(self.phone_of(self.pg.application_id(rs[1].json())), json.loads(post)["phone"].replace("-", ""))

        # Twenty POSTs in one write: answer i belongs to request i (its id has phone i).
        posts = [self.body() for _ in range(20)]
        data = raw_exchange(self.td.port, b"".join(post_bytes(p) for p in posts)
                            + get_bytes("/healthz", close=True), timeout=10)
        rs = parse_responses(data)
        self.assertEqual([r.status for r in rs], [201] * 20 + [200])
        for p, r in zip(posts, rs):
            self.assertEqual(self.phone_of(self.pg.application_id(r.json())),
                             json.loads(p)["phone"].replace("-", ""), "answers out of order")
        self.assert_serving()

    def test_split_writes(self):
        body = self.body()
        msg = post_bytes(body)
        cuts = [2, 9, 30, 31, 60, len(msg) - len(body) - 1, len(msg) - len(body) + 3,
                len(msg) - 7, len(msg)]
        with socket.create_connection(("127.0.0.1", self.td.port), timeout=15) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            prev = 0
            for c in cuts:
                s.sendall(msg[prev:c])
                prev = c
                time.sleep(0.05)
            r = read_response(s)
            self.assertEqual(r.status, 201, r.body)
            # The head of the next request byte by byte on the same connection.
            for ch in get_bytes("/healthz"):
                s.sendall(bytes([ch]))
            self.assertEqual(read_response(s).status, 200)
        self.assertEqual(self.rows(), 1)
        self.assert_serving()

    def test_chunked_body_accepted(self):
        body = self.body()
        msg = (b"POST /v1/applications HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + chunked([body[:7], body[7:30], body[30:]]))
        with socket.create_connection(("127.0.0.1", self.td.port), timeout=15) as s:
            s.sendall(msg)
            r = read_response(s)
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(self.phone_of(self.pg.application_id(r.json())),
                         json.loads(body)["phone"].replace("-", ""))
        self.assert_serving()

    # ---------------------------------------------------------------- size limits

    def test_431_header_too_big_or_too_many(self):
        big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n"
        data = raw_exchange(self.td.port, post_bytes(self.body(), extra=big), timeout=10)
        self.assertEqual(self.first_status(data), 431, data[:300])
        many = b"".join(f"X-H{i}: v\r\n".encode() for i in range(MAX_HEADERS + 5))
        data = raw_exchange(self.td.port, post_bytes(self.body(), extra=many), timeout=10)
        self.assertEqual(self.first_status(data), 431, data[:300])
        self.assertEqual(self.rows(), 0)
        self.assert_serving()

    def test_413_body_too_big_and_limit_inclusive(self):
        # Exactly MAX_BODY bytes is allowed (unknown fields are ignored), one more is not.
        base = self.body(pad="")
        exact = self.body(pad="x" * (MAX_BODY - len(base)))
        self.assertEqual(len(exact), MAX_BODY)
        r = self.td.request("POST", "/v1/applications", body=exact,
                            headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 201, r.body)
        over = self.body(pad="x" * (MAX_BODY - len(base) + 1))
        r = self.td.request("POST", "/v1/applications", body=over,
                            headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 413, r.body)
        # A huge Content-Length is refused without waiting for the body.
        data = raw_exchange(self.td.port, b"POST /v1/applications HTTP/1.1\r\nHost: t\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n",
                            timeout=10)
        self.assertEqual(self.first_status(data), 413, data[:300])
        # A chunked body that grows past the limit.
        big = self.body(pad="y" * (2 * MAX_BODY))
        data = raw_exchange(self.td.port, b"POST /v1/applications HTTP/1.1\r\nHost: t\r\n"
                            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + chunked([big[:600], big[600:1200], big[1200:]]), timeout=10)
        self.assertEqual(self.first_status(data), 413, data[:300])
        self.assertEqual(self.rows(), 1)
        self.assert_serving()

    # ---------------------------------------------------------------- bad requests

    def test_400_malformed(self):
        cases = [
            b"GARBAGE\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",
            b"POST /v1/applications HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
            b"POST /v1/applications HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad\x01Name: v\r\n\r\n",
        ]
        for raw in cases:
            data = raw_exchange(self.td.port, raw, timeout=10)
            self.assertEqual(self.first_status(data), 400, (raw, data[:300]))
        self.assertEqual(self.rows(), 0)
        self.assert_serving()

    def test_405_and_404(self):
        for method, path, want in [("DELETE", "/v1/applications", 405),
                                   ("PUT", "/v1/applications", 405),
                                   ("GET", "/no-such-path", 404),
                                   ("POST", "/v1/no-such-thing", 404)]:
            r = self.td.request(method, path, body=b"{}" if method != "GET" else None,
                                headers={"Content-Type": "application/json"})
            self.assertEqual(r.status, want, (method, path, r.body))
        self.assert_serving()

    # ---------------------------------------------------------------- timeouts

    def test_slowloris_header_timeout_closes(self):
        with socket.create_connection(("127.0.0.1", self.td.port), timeout=15) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            # Keeps sending (one byte each 0.25 s, always less than the timeout apart): only a
            # timeout on the whole head ends this.
            closed, got = wait_closed(s, CLOSE_WAIT_S, trickle=b"X-Slow: abcdefgh\r\n")
        self.assertTrue(closed, "a trickled request head was never cut off")
        if got:
            self.assertEqual(self.first_status(got), 408, got[:200])
        self.assert_serving()

    def test_idle_timeout_closes(self):
        with socket.create_connection(("127.0.0.1", self.td.port), timeout=15) as s:
            s.sendall(get_bytes("/healthz"))
            self.assertEqual(read_response(s).status, 200)
            closed, got = wait_closed(s, CLOSE_WAIT_S)
        self.assertTrue(closed, "an idle keep-alive connection stayed open")
        if got:  # a 408 before closing an idle connection is allowed, nothing else
            self.assertEqual(self.first_status(got), 408, got[:200])
        with socket.create_connection(("127.0.0.1", self.td.port), timeout=15) as s:
            closed, _ = wait_closed(s, CLOSE_WAIT_S)  # never sends a byte
        self.assertTrue(closed, "a silent connection stayed open")
        self.assert_serving()

    def test_slow_body_cut_off_by_request_timeout(self):
        """Issue 11 item 8: a body trickled one byte per second restarted the progress timer
        on every byte and held the connection for ever; REQUEST_TIMEOUT bounds the whole
        request (head and body) and answers 408."""
        request_timeout_s = 3
        td = self.track(Ticketd(self.pg, role="api",
                                env={"REQUEST_TIMEOUT": f"{request_timeout_s}s"}))
        body = self.body()
        before = self.rows()
        with socket.create_connection(("127.0.0.1", td.port), timeout=15) as s:
            s.sendall(post_bytes(body)[:-len(body)])  # the head, announcing the whole body
            t0 = time.monotonic()
            # the body at one byte per second: IDLE_TIMEOUT (60 s) never fires meanwhile
            closed, got = wait_closed(s, CLOSE_WAIT_S, trickle=body, every=1.0)
            took = time.monotonic() - t0
        self.assertTrue(closed, f"a body trickled for {CLOSE_WAIT_S} s was never cut off")
        self.assertTrue(got, "closed without an answer")
        self.assertEqual(self.first_status(got), 408, got[:200])
        self.assertIn(b"request_timeout", got)
        self.assertGreaterEqual(took, request_timeout_s - 1.5, "cut off before the deadline")
        self.assertEqual(self.rows(), before, "a cut-off request left a row")
        self.assert_serving(td)

    # ---------------------------------------------------------------- admission by time

    def test_queue_wait_max_answers_503_at_once_and_loses_nothing(self):
        """Issue 15.2: while the oldest queued application has waited longer than
        QUEUE_WAIT_MAX (PostgreSQL stalled: a lock on applications), new ones are answered
        503 with a Retry-After of 1-3 s at once instead of joining the queue; the queued ones
        still get their 201 once the database moves, and no 201 lacks its row."""
        td = self.track(Ticketd(self.pg, role="api", env={"QUEUE_WAIT_MAX": "300ms"}))
        locker = subprocess.Popen(
            ["psql", "-X", "-q", "-t", "-A", "-h", self.pg.dir, "-p", str(self.pg.port), "-U", "postgres",
             "-d", "ticketd", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: locker.poll() is None and locker.kill())
        locker.stdin.write("BEGIN;\nLOCK TABLE applications IN ACCESS EXCLUSIVE MODE;\n"
                           "SELECT 'locked';\n")
        locker.stdin.flush()
        self.assertEqual(locker.stdout.readline().strip(), "locked")
        released = threading.Event()
        results = {}

        def send(i, body):
            try:
                r = td.request("POST", "/v1/applications", body=body,
                               headers={"Content-Type": "application/json"}, timeout=60)
                results[i] = (r.status, r.headers.get("retry-after"), released.is_set())
            except OSError as e:
                results[i] = (None, repr(e), released.is_set())

        bodies = [self.body() for _ in range(25)]
        threads = []
        last_sent = [time.monotonic()]
        for i, b in enumerate(bodies):  # one every 100 ms while the table is locked
            t = threading.Thread(target=send, args=(i, b), daemon=True)
            t.start()
            threads.append(t)
            last_sent[0] = time.monotonic()
            time.sleep(0.1)
        wait_until(lambda: any(r[0] == 503 for r in results.values()), timeout=20,
                   what="a 503 while the database is stalled")
        # the last ones sent get their answer too before the lock goes (a loaded machine may
        # take a moment): a 503 that arrives after the release would prove nothing
        wait_until(lambda: len(results) >= len(bodies) or
                   time.monotonic() - last_sent[0] > 3.0, timeout=20,
                   what="answers to the requests sent while the database is stalled")
        released.set()
        locker.communicate("COMMIT;\n\\q\n", timeout=30)
        for t in threads:
            t.join(timeout=60)
        self.assertEqual(len(results), len(bodies), results)
        statuses = sorted({r[0] for r in results.values()}, key=str)
        self.assertEqual(statuses, [201, 503], results)
        for i, (st, retry_after, after_release) in results.items():
            if st == 503:
                self.assertFalse(after_release, f"request {i}: its 503 waited for the database")
                self.assertIn(retry_after, ("1", "2", "3"), f"request {i}: Retry-After")
        # nothing lost: every 201 has its row, no 503 left one
        for i, (st, _, _) in results.items():
            phone = json.loads(bodies[i])["phone"].replace("-", "")
            n = self.pg.count(f"applications WHERE event_id = '{self.ev}' AND "
                              f"regexp_replace(phone, '[^0-9]', '', 'g') = '{phone}'")
            self.assertEqual(n, 1 if st == 201 else 0, f"request {i} answered {st}: {n} rows")
        self.assert_serving(td)

    # ---------------------------------------------------------------- connection limit

    def hold_connections(self, td, n):
        """n keep-alive connections that each got a 200 (the harness's probes may still hold
        slots briefly)."""
        def open_one():
            s = socket.create_connection(("127.0.0.1", td.port), timeout=15)
            s.sendall(get_bytes("/healthz"))
            try:
                r = read_response(s, timeout=3)
            except OSError:
                r = None
            if r is not None and r.status == 200:
                return s
            s.close()
            return None
        return [wait_until(open_one, timeout=30, what="a connection under the limit")
                for _ in range(n)]

    def test_connection_limit_stops_accepting(self):
        """Issue 15.1: at MAX_CONNECTIONS the server stops accepting (the kernel's backlog
        queues the next connection) instead of answering 503 and inviting a reconnect storm;
        a slot freed below the limit takes the waiting connection in, which is answered."""
        limit = 4
        td = self.track(Ticketd(self.pg, role="api", env={"MAX_CONNECTIONS": limit}))
        held = self.hold_connections(td, limit)
        try:
            extra = socket.create_connection(("127.0.0.1", td.port), timeout=15)
            held.append(extra)
            extra.sendall(get_bytes("/healthz"))
            readable, _, _ = select.select([extra], [], [], 1.5)
            self.assertFalse(readable, "a connection over the limit was answered or closed: "
                                       f"{extra.recv(200) if readable else b''!r}")
            for s in held[:limit]:  # the held connections still work
                s.sendall(get_bytes("/healthz"))
                self.assertEqual(read_response(s).status, 200)
            held.pop(0).close()
            self.assertEqual(read_response(extra).status, 200, "the queued connection")
        finally:
            for s in held:
                s.close()
        self.assert_serving(td)

    def test_connection_limit_reject_mode(self):
        limit = 4
        td = self.track(Ticketd(self.pg, role="api", env={"MAX_CONNECTIONS": limit,
                                                          "CONNECTION_OVERFLOW": "reject"}))
        held = self.hold_connections(td, limit)
        try:
            extra = socket.create_connection(("127.0.0.1", td.port), timeout=15)
            try:
                extra.sendall(get_bytes("/healthz"))
                try:
                    r = read_response(extra)
                except OSError:
                    r = None  # closed at once, also a refusal
            except OSError:
                r = None
            finally:
                extra.close()
            self.assertTrue(r is None or r.status == 503, f"over the limit: {r!r}")
            if r is not None:
                self.assertEqual(r.headers.get("retry-after"), "1")
            for s in held:  # the held connections still work
                s.sendall(get_bytes("/healthz"))
                self.assertEqual(read_response(s).status, 200)
            held.pop().close()

            def slot_free():
                s = self.hold_connections(td, 1)[0]
                s.close()
                return True

            wait_until(slot_free, timeout=20, what="a free slot after closing one")
        finally:
            for s in held:
                s.close()
        self.assert_serving(td)

if __name__ == "__main__":
    unittest.main()
