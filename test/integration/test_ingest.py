"""Issue 2: the durable ingest path (HTTP -> PostgreSQL, group commit), against the real
binary and a throwaway PostgreSQL. ROLE=api keeps Kafka out of these tests: nothing here
depends on the relay or the consumer, and every assertion reads back what PostgreSQL holds.

Guarantee under test: a 201 is sent only after the commit that holds both the application
row and its outbox row; every other answer leaves the tables as they were (bad input) or
is a 409/503 that never pretends a write happened."""
import datetime
import json
import os
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.parse
import uuid

from harness import (ApiTestCase, Pg, Ticketd, TicketdTestCase, parallel, phone_for,
                     read_response, run_ticketd, wait_until)

# Sizes of the concurrent runs; small enough to keep the file well under a minute.
DISTINCT_N = int(os.environ.get("TEST_INGEST_DISTINCT", "2000"))
DUPLICATES_N = 50


_DROP = object()  # with_(field=_DROP) removes the field


def new_event(prefix="ev"):
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def sql_str(s):
    return "'" + s.replace("'", "''") + "'"


def digits(phone):
    return "".join(ch for ch in phone if ch.isdigit())


def parse_time(s):
    """RFC 3339 (as in 201 bodies and payloads) -> aware datetime."""
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def application_body(i, event_id):
    """A valid body whose optional fields vary with i, so the payload check sees all kinds."""
    body = {"event_id": event_id, "phone": phone_for(i),
            "name": ["Kim Minji", "김민지", "Lee O'Brien", "Ñandú Zoë"][i % 4] + f" {i}"}
    if i % 3 == 0:
        body["email"] = f"fan{i}@example.com"
    if i % 5 != 0:
        body["seats"] = 1 + i % 4
    return body


def post(td, body, headers=None, timeout=30):
    """POST /v1/applications; returns (body, Response) or (body, exception)."""
    try:
        return body, td.request("POST", "/v1/applications", json=body, headers=headers,
                                timeout=timeout)
    except Exception as e:  # recorded, asserted by the caller
        return body, e


def as_list(obj):
    """The lookup answers a list (bare, or as the one list inside an object)."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise AssertionError(f"lookup did not answer a list: {obj!r}")


class IngestCase(TicketdTestCase):
    """Helpers that read back what PostgreSQL holds."""

    def applications(self, pg, event_id):
        rows = pg.query(
            "SELECT id, phone, name, email, seats, "
            "       extract(epoch FROM created_at)::text, reference FROM applications "
            f"WHERE event_id = {sql_str(event_id)} ORDER BY id")
        return {int(r[0]): {"phone": r[1], "name": r[2], "email": r[3], "seats": int(r[4]),
                            "created_at": float(r[5]), "reference": r[6]} for r in rows}

    def outbox(self, pg, event_id):
        """Outbox rows of an event (found by payload, so rows without an application count)."""
        rows = pg.query("SELECT aggregate_id, event_type, payload::text FROM outbox "
                        f"WHERE payload->>'event_id' = {sql_str(event_id)} ORDER BY id")
        return [(int(r[0]), r[1], json.loads(r[2])) for r in rows]

    def assert_no_orphans(self, pg):
        """Application and outbox rows exist only together (one transaction)."""
        self.assertEqual(pg.count("applications a WHERE NOT EXISTS "
                                  "(SELECT 1 FROM outbox o WHERE o.aggregate_id = a.id)"), 0,
                         "applications without an outbox row")
        self.assertEqual(pg.count("outbox o WHERE NOT EXISTS "
                                  "(SELECT 1 FROM applications a WHERE a.id = o.aggregate_id)"), 0,
                         "outbox rows without an application")

    def assert_created_durable(self, pg, event_id, created, exact=True):
        """created: [(request body, 201 JSON)]. Every 201 has exactly one application row and
        one outbox row, both matching the request; with exact=True the event holds no others."""
        refs = [resp["reference"] for _, resp in created]
        self.assertEqual(len(refs), len(set(refs)), "two 201s carry the same reference")
        apps = self.applications(pg, event_id)
        by_ref = {row["reference"]: i for i, row in apps.items()}
        ids = [by_ref.get(ref) for ref in refs]
        outbox = self.outbox(pg, event_id)
        per_aggregate = {}
        for agg, etype, payload in outbox:
            per_aggregate.setdefault(agg, []).append((etype, payload))
        if exact:
            self.assertEqual(set(apps), set(ids), "application rows differ from the 201s")
            self.assertEqual(set(per_aggregate), set(ids), "outbox rows differ from the 201s")
        for (req, resp), i in zip(created, ids):
            self.assertNotIn("id", resp, "the internal id is not in public answers")
            self.assertRegex(resp["reference"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            self.assertIsInstance(i, int, f"201 reference {resp['reference']} has no application row")
            self.assertEqual(resp["event_id"], req["event_id"])
            self.assertEqual(resp["status"], "applied")
            self.assertIn(i, apps, f"201 id {i} has no application row")
            row = apps[i]
            self.assertEqual(row["phone"], digits(req["phone"]))
            self.assertEqual(row["name"], req["name"])
            self.assertEqual(row["email"], req.get("email"))
            self.assertEqual(row["seats"], req.get("seats", 1))
            self.assertAlmostEqual(parse_time(resp["created_at"]).timestamp(), row["created_at"],
                                   delta=0.001)
            events = per_aggregate.get(i, [])
            self.assertEqual(len(events), 1, f"201 id {i} has {len(events)} outbox rows")
            etype, payload = events[0]
            self.assertEqual(etype, "TicketApplied")
            self.assertEqual(payload["id"], i)
            self.assertEqual(payload["event_id"], req["event_id"])
            self.assertEqual(payload["phone"], digits(req["phone"]))
            self.assertEqual(payload["name"], req["name"])
            self.assertEqual(payload.get("email"), req.get("email"))
            self.assertEqual(payload["seats"], req.get("seats", 1))
            self.assertAlmostEqual(parse_time(payload["created_at"]).timestamp(),
                                   row["created_at"], delta=0.001)

    def run_distinct(self, td, pg, n, workers=64):
        event_id = new_event("distinct")
        results = parallel(lambda i: post(td, application_body(i, event_id)), range(n),
                           workers=workers)
        errors = [(b, r) for b, r in results if isinstance(r, Exception) or r.status != 201]
        self.assertEqual(errors[:5], [], f"{len(errors)} of {n} distinct applications failed")
        self.assert_created_durable(pg, event_id, [(b, r.json()) for b, r in results])
        return event_id

    def run_duplicates(self, td, pg, n=DUPLICATES_N):
        """n concurrent applications of one person (phone written two ways): one 201, n-1
        409s without any reference, one row."""
        event_id = new_event("dup")
        barrier = threading.Barrier(n)

        def one(i):
            body = {"event_id": event_id, "phone": "010-5555-0101" if i % 2 else "01055550101",
                    "name": "Park Jisoo"}
            barrier.wait(timeout=30)
            return post(td, body)

        results = parallel(one, range(n), workers=n)
        for _, r in results:
            self.assertNotIsInstance(r, Exception)
        statuses = sorted(r.status for _, r in results)
        self.assertEqual(statuses, [201] + [409] * (n - 1))
        created = [(b, r.json()) for b, r in results if r.status == 201]
        the_id = pg.application_id(created[0][1])
        for _, r in results:
            if r.status == 409:
                self.assertEqual(r.json().get("error"), "already_applied", r.body)
                self.assertNotIn("reference", r.json(), r.body)
                self.assertNotIn("id", r.json(), r.body)
        self.assert_created_durable(pg, event_id, created)
        return the_id


class IngestTest(IngestCase, ApiTestCase):
    """Tests that share one ticketd (ROLE=api) on the class's PostgreSQL."""

    def test_concurrent_distinct_applications_each_have_their_rows(self):
        self.run_distinct(self.td, self.pg, DISTINCT_N)
        self.assert_no_orphans(self.pg)

    def test_concurrent_duplicates_one_row_rest_409_same_id(self):
        self.run_duplicates(self.td, self.pg)

    def test_idempotency_key_retry_replays_the_original_201(self):
        event_id = new_event("idem")
        body = {"event_id": event_id, "phone": "010-2222-3333", "name": "Choi Yuna",
                "email": "yuna@example.com", "seats": 2}
        key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
        first = self.td.request("POST", "/v1/applications", json=body, headers=key)
        self.assertEqual(first.status, 201, first.body)
        for _ in range(3):
            again = self.td.request("POST", "/v1/applications", json=body, headers=key)
            self.assertEqual(again.status, 201, again.body)
            self.assertEqual(again.json(), first.json())
        # The same person without the key (or with another key) is a duplicate, not a replay.
        other = self.td.request("POST", "/v1/applications", json=body,
                                headers={"Idempotency-Key": f"other-{uuid.uuid4()}"})
        self.assertEqual(other.status, 409, other.body)
        self.assertNotIn("reference", other.json())
        nokey = self.td.request("POST", "/v1/applications", json=body)
        self.assertEqual(nokey.status, 409, nokey.body)
        self.assertNotIn("reference", nokey.json())
        self.assert_created_durable(self.pg, event_id, [(body, first.json())])
        self.assertEqual(self.pg.scalar(
            f"SELECT idempotency_key FROM applications WHERE id = {self.pg.application_id(first.json())}"),
            key["Idempotency-Key"])

    def test_idempotency_key_with_another_body_is_422_and_writes_nothing(self):
        """Issue 12: on main the same key with another phone created a second application and
        the same key with another name replayed the old 201, dropping the change."""
        event_id = new_event("idem422")
        body = {"event_id": event_id, "phone": "010-2222-4444", "name": "Choi Yuna"}
        key = {"Idempotency-Key": f"k422-{uuid.uuid4()}"}
        first = self.td.request("POST", "/v1/applications", json=body, headers=key)
        self.assertEqual(first.status, 201, first.body)
        # the same body in another spelling (phone format, key order, seats given as the
        # default) is the same request: replayed
        same = {"seats": 1, "name": "Choi Yuna", "phone": "01022224444", "event_id": event_id}
        again = self.td.request("POST", "/v1/applications", json=same, headers=key)
        self.assertEqual(again.status, 201, again.body)
        self.assertEqual(again.json(), first.json())
        self.assertEqual(again.headers.get("idempotent-replayed"), "true")
        for change in ({"phone": "010-2222-5555"}, {"name": "Choi Yuna Changed"},
                       {"seats": 2}, {"event_id": new_event("idem422other")}):
            r = self.td.request("POST", "/v1/applications", json=dict(body, **change), headers=key)
            self.assertEqual(r.status, 422, f"{change}: {r.body}")
            self.assertEqual(r.json()["error"], "idempotency_key_reused", r.body)
            self.assertNotIn("reference", r.json())
        self.assertEqual(self.pg.count(f"applications WHERE phone = '01022225555'"), 0)
        self.assertEqual(self.pg.count(f"applications WHERE idempotency_key = {sql_str(key['Idempotency-Key'])}"), 1)
        self.assertEqual(self.pg.count(f"applications WHERE event_id = {sql_str(event_id)}"), 1)
        self.assertEqual(self.pg.scalar(f"SELECT name FROM applications WHERE event_id = {sql_str(event_id)}"),
                         "Choi Yuna")

    def test_idempotency_key_in_flight_is_409(self):
        """A second request with a key whose first request is still waiting for its commit
        gets 409 at once (the first is held by a lock on the applications table)."""
        event_id = new_event("inflight")
        body = {"event_id": event_id, "phone": "010-2222-6666", "name": "Choi Yuna"}
        key = {"Idempotency-Key": f"kif-{uuid.uuid4()}"}
        lock = subprocess.Popen(
            ["psql", "-X", "-h", self.pg.dir, "-p", str(self.pg.port), "-U", "postgres", "-d", "ticketd",
             "-v", "ON_ERROR_STOP=1", "-c",
             "BEGIN; LOCK TABLE applications IN EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.pg.count("pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                             "WHERE c.relname = 'applications' AND l.mode = 'ExclusiveLock' "
                                             "AND l.granted") == 1, timeout=30, what="table lock")
            results = []
            t = threading.Thread(target=lambda: results.append(post(self.td, body, headers=key)))
            t.start()
            wait_until(lambda: self.pg.count("pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                             "WHERE c.relname = 'applications' AND NOT l.granted") >= 1,
                       timeout=30, what="the first insert waiting on the lock")
            second = self.td.request("POST", "/v1/applications", json=body, headers=key)
            self.assertEqual(second.status, 409, second.body)
            self.assertEqual(second.json()["error"], "idempotency_key_in_flight", second.body)
            self.assertEqual(second.headers.get("retry-after"), "1")
            t.join(timeout=60)
        finally:
            lock.wait(timeout=60)
        self.assertEqual(results[0][1].status, 201, results[0][1].body)
        third = self.td.request("POST", "/v1/applications", json=body, headers=key)
        self.assertEqual(third.status, 201, third.body)
        self.assertEqual(third.json(), results[0][1].json())

    def test_bad_bodies_get_4xx_with_field_message_and_no_row(self):
        ev = new_event("bad")
        ok = {"event_id": ev, "phone": "010-7777-8888", "name": "Jung Hoseok"}

        def with_(**kw):
            b = dict(ok)
            for k, v in kw.items():
                if v is _DROP:
                    b.pop(k)
                else:
                    b[k] = v
            return json.dumps(b).encode()

        def raw(name_bytes):
            return (b'{"event_id":"' + ev.encode() + b'","phone":"010-7777-8888","name":"'
                    + name_bytes + b'"}')

        JSON = "application/json"
        # (label, body, content type, expected status (or None: any 4xx), field named: one,
        # or a tuple of acceptable ones; bytes that are not UTF-8 may be refused as the body's)
        cases = [
            ("not json", b"hello", JSON, 400, None),
            ("truncated json", with_()[:-5], JSON, 400, None),
            ("array", b"[1,2,3]", JSON, 400, None),
            ("string", b'"x"', JSON, 400, None),
            ("number", b"42", JSON, 400, None),
            ("null", b"null", JSON, 400, None),
            ("trailing garbage", with_() + b" {}", JSON, 400, None),
            ("deep nesting", b"[" * 5000 + b"]" * 5000, JSON, 400, None),
            ("empty body", b"", JSON, 400, None),
            ("event_id number", with_(event_id=123), JSON, 400, "event_id"),
            ("phone number", with_(phone=1077778888), JSON, 400, "phone"),
            ("name array", with_(name=["a"]), JSON, 400, "name"),
            ("name null", with_(name=None), JSON, 400, "name"),
            ("email number", with_(email=5), JSON, 400, "email"),
            ("seats string", with_(seats="2"), JSON, 400, "seats"),
            ("seats fraction", with_(seats=2.5), JSON, 400, "seats"),
            ("seats bool", with_(seats=True), JSON, 400, "seats"),
            ("missing event_id", with_(event_id=_DROP), JSON, 400, "event_id"),
            ("missing phone", with_(phone=_DROP), JSON, 400, "phone"),
            ("missing name", with_(name=_DROP), JSON, 400, "name"),
            ("event_id empty", with_(event_id=""), JSON, 400, "event_id"),
            ("event_id space", with_(event_id="has space"), JSON, 400, "event_id"),
            ("event_id slash", with_(event_id="a/b"), JSON, 400, "event_id"),
            ("event_id 65 chars", with_(event_id="e" * 65), JSON, 400, "event_id"),
            ("event_id non-ascii", with_(event_id="콘서트"), JSON, 400, "event_id"),
            ("phone landline", with_(phone="02-1234-5678"), JSON, 400, "phone"),
            ("phone 012 prefix", with_(phone="012-1234-5678"), JSON, 400, "phone"),
            ("phone too short", with_(phone="010-12-3456"), JSON, 400, "phone"),
            ("phone too long", with_(phone="010-12345-67890"), JSON, 400, "phone"),
            ("phone letters", with_(phone="abc"), JSON, 400, "phone"),
            ("phone empty", with_(phone=""), JSON, 400, "phone"),
            ("name empty", with_(name=""), JSON, 400, "name"),
            ("name 101 chars", with_(name="가" * 101), JSON, 400, "name"),
            ("name control char", with_(name="bell\u0007"), JSON, 400, "name"),
            ("name NUL escape", with_(name="Kim\u0000Minji"), JSON, 400, "name"),
            ("event_id NUL escape", with_(event_id="ev\u0000x"), JSON, 400, "event_id"),
            ("email no at", with_(email="no-at-sign.example.com"), JSON, 400, "email"),
            ("email no domain", with_(email="user@"), JSON, 400, "email"),
            ("email no local part", with_(email="@example.com"), JSON, 400, "email"),
            ("seats 0", with_(seats=0), JSON, 400, "seats"),
            ("seats 5", with_(seats=5), JSON, 400, "seats"),
            ("seats -1", with_(seats=-1), JSON, 400, "seats"),
            ("invalid utf-8 byte", raw(b"Kim \xff"), JSON, 400, ("name", "body")),
            ("overlong utf-8", raw(b"Kim \xc0\xaf"), JSON, 400, ("name", "body")),
            ("utf-8 surrogate", raw(b"Kim \xed\xa0\x80"), JSON, 400, ("name", "body")),
            ("truncated utf-8", raw(b"Kim \xe4\xb8"), JSON, 400, ("name", "body")),
            ("too big", json.dumps(dict(ok, pad="x" * 17000)).encode(), JSON, 413, None),
            ("text/plain", with_(), "text/plain", 415, None),
            ("form", with_(), "application/x-www-form-urlencoded", 415, None),
            ("no content type", with_(), None, None, None),
        ]
        failures = []
        for label, body, ctype, want, field in cases:
            before = (self.pg.count("applications"), self.pg.count("outbox"))
            headers = {"Content-Type": ctype} if ctype else {}
            r = self.td.request("POST", "/v1/applications", body=body, headers=headers)
            after = (self.pg.count("applications"), self.pg.count("outbox"))
            problem = None
            if want is not None and r.status != want:
                problem = f"status {r.status}, want {want}"
            elif not 400 <= r.status < 500:
                problem = f"status {r.status}, want 4xx"
            elif after != before:
                problem = f"rows changed {before} -> {after}"
            else:
                try:
                    err = r.json()
                except ValueError:
                    err = None
                if not isinstance(err, dict) or "error" not in err:
                    problem = f"error body is not JSON with 'error': {r.body[:200]!r}"
                elif field and not any(f in json.dumps(err) for f in
                                       ((field,) if isinstance(field, str) else field)):
                    problem = f"error does not name the field {field!r}: {err}"
            if problem:
                failures.append(f"{label}: {problem}")
        self.assertEqual(failures, [])
        # The same valid body is accepted, with or without a charset parameter.
        r = self.td.request("POST", "/v1/applications", body=with_(),
                            headers={"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(self.pg.count(f"applications WHERE event_id = {sql_str(ev)}"), 1)

    def test_get_by_reference_admin_by_id_and_lookup_and_404(self):
        ev = new_event("get")
        body = {"event_id": ev, "phone": "010-3141-5926", "name": "Han Seol", "seats": 3}
        created = self.td.request("POST", "/v1/applications", json=body)
        self.assertEqual(created.status, 201, created.body)
        ref = created.json()["reference"]
        app_id = self.pg.application_id(created.json())

        r = self.td.request("GET", f"/v1/applications/{ref}")
        self.assertEqual(r.status, 200, r.body)
        got = r.json()
        self.assertEqual(got, {"reference": ref, "event_id": ev, "status": "applied",
                               "phone": "010-****-5926", "seats": 3,
                               "created_at": created.json()["created_at"]})
        r = self.td.request("GET", f"/v1/applications/{ref.upper()}")
        self.assertEqual(r.status, 200, r.body)

        r = self.td.admin("GET", f"/admin/applications/{app_id}")
        self.assertEqual(r.status, 200, r.body)
        got = r.json()
        self.assertEqual((got["id"], got["reference"], got["event_id"], got["status"], got["name"]),
                         (app_id, ref, ev, "applied", "Han Seol"))
        for phone in ("010-3141-5926", "01031415926"):
            q = urllib.parse.urlencode({"event_id": ev, "phone": phone})
            r = self.td.admin("GET", f"/admin/applications?{q}")
            self.assertEqual(r.status, 200, r.body)
            found = as_list(r.json())
            self.assertEqual([a["id"] for a in found], [app_id], found)

        q = urllib.parse.urlencode({"event_id": new_event("none"), "phone": "010-3141-5926"})
        r = self.td.admin("GET", f"/admin/applications?{q}")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(as_list(r.json()), [])

        max_id = int(self.pg.scalar("SELECT coalesce(max(id), 0) FROM applications"))
        r = self.td.admin("GET", f"/admin/applications/{max_id + 1000}")
        self.assertEqual(r.status, 404, r.body)
        r = self.td.request("GET", f"/v1/applications/{uuid.uuid4()}")
        self.assertEqual(r.status, 404, r.body)
        for bad in ("not-a-number", str(app_id), ref[:-1], ref + "0", ref.replace("-", "")):
            r = self.td.request("GET", f"/v1/applications/{bad}")
            self.assertEqual(r.status, 404, f"{bad}: {r.body}")


class IngestFaultTest(IngestCase):
    """Tests that stop PostgreSQL or ticketd; each starts its own ticketd."""

    def load(self, td, event_id, threads=8, base=0):
        """Starts client threads posting distinct applications until stop is set or a request
        fails at the connection level. Returns (stop event, results list, thread list)."""
        stop = threading.Event()
        results = []
        lock = threading.Lock()

        def client(k):
            i = 0
            while not stop.is_set():
                body = {"event_id": event_id, "phone": phone_for(base + k * 1_000_000 + i),
                        "name": f"Load {k}-{i}"}
                i += 1
                b, r = post(td, body, timeout=30)
                with lock:
                    results.append((b, r))
                if isinstance(r, Exception):
                    return
                if r.status == 503:
                    time.sleep(0.01)

        ts = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(threads)]
        for t in ts:
            t.start()
        return stop, results, ts

    def statuses(self, results, since=0):
        return [r.status for _, r in results[since:] if not isinstance(r, Exception)]

    def test_postgres_stopped_503_then_recovers_without_restart(self):
        pg = self.track(Pg())
        td = self.track(Ticketd(pg, role="api"))
        ev = new_event("pgdown")
        stop, results, threads = self.load(td, ev, threads=4)
        try:
            wait_until(lambda: self.statuses(results).count(201) >= 50, timeout=60,
                       what="201s before the stop")
            pg.stop()
            mark = len(results)
            wait_until(lambda: self.statuses(results, mark).count(503) >= 20, timeout=60,
                       what="503s while PostgreSQL is down")
            pg.start()
            mark2 = len(results)
            wait_until(lambda: self.statuses(results, mark2).count(201) >= 20, timeout=90,
                       what="201s after PostgreSQL came back")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        self.assertTrue(td.alive(), "ticketd exited")
        errors = [(b["phone"], repr(r)) for b, r in results if isinstance(r, Exception)]
        self.assertEqual(errors, [], "requests failed at the connection level")
        others = [(r.status, r.body[:120]) for _, r in results if r.status not in (201, 503)]
        self.assertEqual(others, [], "answers other than 201/503")
        for _, r in results:
            if r.status == 503:
                self.assertRegex(r.headers.get("retry-after", ""), r"^\d+$",
                                 "503 without a Retry-After")
                self.assertIn("error", r.json())
        created = [(b, r.json()) for b, r in results if r.status == 201]
        # 503 means "not known to be written": those rows may or may not exist (exact=False);
        # every 201 must have its rows.
        self.assert_created_durable(pg, ev, created, exact=False)
        self.assert_no_orphans(pg)
        rows = self.applications(pg, ev)
        phones_201 = {digits(b["phone"]) for b, _ in created}
        for row in rows.values():
            self.assertIn(row["phone"], phones_201 | {digits(b["phone"]) for b, r in results
                                                       if r.status == 503},
                          "a row for a phone that never got 201/503")

    def test_sigkill_during_load_every_201_has_its_rows(self):
        td = self.track(Ticketd(self.pg, role="api"))
        ev = new_event("kill")
        stop, results, threads = self.load(td, ev, threads=8)
        try:
            wait_until(lambda: self.statuses(results).count(201) >= 300, timeout=60,
                       what="201s before the kill")
            td.kill()
            for t in threads:
                t.join(timeout=60)  # each ends at its first connection error
        finally:
            stop.set()
        created = [(b, r.json()) for b, r in results
                   if not isinstance(r, Exception) and r.status == 201]
        self.assertGreaterEqual(len(created), 300)
        self.assert_created_durable(self.pg, ev, created, exact=False)
        self.assert_no_orphans(self.pg)
        # A new process sees them: re-applying gets 409; the reference the client was given
        # names the row.
        td2 = self.track(Ticketd(self.pg, role="api"))
        for b, resp in created[:5] + created[-5:]:
            r = td2.request("POST", "/v1/applications", json=b)
            self.assertEqual(r.status, 409, r.body)
            self.assertEqual(td2.request("GET", f"/v1/applications/{resp['reference']}").status, 200)

    def test_canned_is_not_a_setting_of_the_service(self):
        """Issue 12: on main CANNED=true made ticketd answer 201 without touching the database.
        That mode exists only in the bench binary ticketd-canned now; ticketd ignores it."""
        td = self.track(Ticketd(self.pg, role="api", env={"CANNED": "true"}))
        ev = new_event("canned")
        r = td.request("POST", "/v1/applications", json={"event_id": ev, "phone": "010-4545-1212",
                                                          "name": "Not Canned"})
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(self.pg.count(f"applications WHERE event_id = {sql_str(ev)} AND "
                                       f"reference = {sql_str(r.json()['reference'])}"), 1)
        self.assertNotIn("canned", td.log_text())

    def test_sigterm_answers_in_flight_and_exits_0(self):
        td = self.track(Ticketd(self.pg, role="api"))
        ev = new_event("term")
        n = 8
        socks = []
        try:
            for _ in range(n):  # accepted, keep-alive connections
                s = socket.create_connection(("127.0.0.1", td.port), timeout=15)
                socks.append(s)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                self.assertEqual(read_response(s).status, 200)
            # Hold the applications table so the inserts wait inside PostgreSQL.
            holder = subprocess.Popen(
                ["psql", "-X", "-q", "-h", self.pg.dir, "-p", str(self.pg.port), "-U", "postgres",
                 "-d", "ticketd", "-c",
                 "BEGIN; LOCK TABLE applications IN EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.addCleanup(lambda: holder.poll() is None and holder.kill())
            wait_until(lambda: self.pg.count(
                "pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = "
                "'applications' AND l.mode = 'ExclusiveLock' AND l.granted") == 1,
                timeout=20, what="the table lock")
            bodies = []
            for k, s in enumerate(socks):
                body = json.dumps({"event_id": ev, "phone": phone_for(4200 + k),
                                   "name": f"Term {k}"}).encode()
                bodies.append(json.loads(body))
                s.sendall(b"POST /v1/applications HTTP/1.1\r\nHost: t\r\n"
                          b"Content-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: self.pg.count(
                "pg_stat_activity WHERE datname = 'ticketd' AND wait_event_type = 'Lock'") >= 1,
                timeout=20, what="an insert waiting for the lock")
            td.signal(signal.SIGTERM)
            self.assertIsNone(holder.poll(), "lock released before SIGTERM: nothing was in flight")
            answers = [read_response(s, timeout=30) for s in socks]
        finally:
            for s in socks:
                s.close()
        self.assertEqual(td.proc.wait(timeout=30), 0, "exit status after SIGTERM")
        self.assertEqual(holder.wait(timeout=30), 0, holder.stderr.read())
        self.assertNotIn(None, answers, "a connection closed without an answer")
        self.assertEqual([a.status for a in answers], [201] * n, [a.body for a in answers])
        self.assert_created_durable(self.pg, ev, list(zip(bodies, [a.json() for a in answers])))

    def test_migrate_twice_is_idempotent(self):
        db = f"mig_{uuid.uuid4().hex[:8]}"
        self.pg.execute(f"CREATE DATABASE {db}", db="postgres")
        url = f"host={self.pg.dir} port={self.pg.port} user=postgres dbname={db}"
        env = {"DATABASE_URL": url}
        first = run_ticketd(["migrate"], env=env)
        self.assertEqual(first.returncode, 0, first.stderr)
        tables = {r[0] for r in self.pg.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", db=db)}
        for t in ("schema_migrations", "applications", "outbox", "processed_events",
                  "points_ledger"):
            self.assertIn(t, tables)
        snapshot_sql = "SELECT version, name, applied_at::text FROM schema_migrations ORDER BY 1"
        schema_sql = ("SELECT table_name, column_name, data_type FROM information_schema.columns "
                      "WHERE table_schema = 'public' ORDER BY 1, 2")
        migrations = self.pg.query(snapshot_sql, db=db)
        self.assertGreaterEqual(len(migrations), 1)
        schema = self.pg.query(schema_sql, db=db)
        second = run_ticketd(["migrate"], env=env)
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertEqual(self.pg.query(snapshot_sql, db=db), migrations)
        self.assertEqual(self.pg.query(schema_sql, db=db), schema)

    def test_batch_max_1_same_guarantees(self):
        td = self.track(Ticketd(self.pg, role="api", env={"BATCH_MAX": "1"}))
        self.run_distinct(td, self.pg, 300, workers=32)
        self.run_duplicates(td, self.pg, n=20)
        self.assert_no_orphans(self.pg)


if __name__ == "__main__":
    unittest.main()
