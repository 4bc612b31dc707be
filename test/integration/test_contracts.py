"""Issue 16, item 5: the contract documents cannot drift from the code.

docs/openapi.yaml must list exactly the routes of src/api.c's route table (method, path,
admin or not), every schema in it must compile (Draft 2020-12), and every (status, error
code) literal the C code answers must fit a documented response of that status. Then a live
ticketd (ADMIN_TOKEN, kafka-mock, fake sink) is driven through every route and every answer
that can be provoked; each live status must be documented for its route, and the body and
the documented headers must validate against that response. Records read back with kcat from
ticket-applied and ticket-applied.DLQ (one event made to fail at the sink) must validate
against docs/events.schema.json, and docs/asyncapi.yaml must point into it.
Uses Debian's python3-jsonschema and python3-yaml."""
import json
import os
import re
import sys
import unittest
import uuid

import jsonschema
import yaml
from jsonschema import Draft202012Validator, RefResolver

import harness as h
from fake_sink import FakeSink

DOCS = os.path.join(h.SOURCE_DIR, "docs")
SRC = os.path.join(h.SOURCE_DIR, "src")
TOPIC = "ticket-applied"
DLQ = "ticket-applied.DLQ"
METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "trace"}


def load_yaml(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


OPENAPI = load_yaml("openapi.yaml")
with open(os.path.join(DOCS, "events.schema.json"), encoding="utf-8") as f:
    EVENTS = json.load(f)
ASYNCAPI = load_yaml("asyncapi.yaml")


def read_src(name):
    with open(os.path.join(SRC, name), encoding="utf-8") as f:
        return f.read()


def resolve(doc, node):
    """Follows local $refs ("#/a/b") of an OpenAPI node until a plain object."""
    while isinstance(node, dict) and "$ref" in node:
        node = RefResolver("", doc).resolve(node["$ref"])[1]
    return node


def validator(doc, schema):
    """A Draft 2020-12 validator of schema whose $refs resolve in doc (format uuid checked)."""
    return Draft202012Validator(schema, resolver=RefResolver("", doc),
                                format_checker=jsonschema.FormatChecker())


def api_routes():
    """{(method, path, prefix, admin)} from the route tables: the public ones of src/api.c and
    the admin ones of src/admin_http.c (the only place that answers /admin/*)."""
    out = set()
    for name, table_name, admin in (("api.c", "public_routes", False),
                                    ("admin_http.c", "routes", True)):
        text = read_src(name)
        table = re.search(r"static const struct api_route %s\[\] = \{(.*?)\n\};" % table_name,
                          text, re.S)
        assert table, f"no route table {table_name} in src/{name}"
        rows = re.findall(r'\{HTTP_(\w+), "([^"]+)", (true|false), "\w+", \w+\}', table.group(1))
        assert rows, f"no routes parsed from src/{name}"
        out |= {(m.lower(), p, pre == "true", admin) for m, p, pre in rows}
    return out


def doc_routes():
    out = set()
    for path, item in OPENAPI["paths"].items():
        prefix = path.endswith("}")
        key = re.sub(r"\{[^}]+\}$", "", path) if prefix else path
        for method, op in item.items():
            if method in METHODS:
                out.add((method, key, prefix, bool(op.get("security"))))
    return out


def openapi_schemas():
    """(where, schema) of every schema the document holds."""
    found = [(f"components/schemas/{k}", v) for k, v in OPENAPI["components"]["schemas"].items()]
    for name, r in OPENAPI["components"]["responses"].items():
        for mt, c in r.get("content", {}).items():
            found.append((f"components/responses/{name} {mt}", c["schema"]))
    for path, item in OPENAPI["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            for p in op.get("parameters", []):
                found.append((f"{method} {path} parameter {p['name']}", p["schema"]))
            for mt, c in op.get("requestBody", {}).get("content", {}).items():
                found.append((f"{method} {path} request {mt}", c["schema"]))
            for status, r in op["responses"].items():
                r = resolve(OPENAPI, r)
                for mt, c in r.get("content", {}).items():
                    found.append((f"{method} {path} {status} {mt}", c["schema"]))
                for hn, hd in r.get("headers", {}).items():
                    found.append((f"{method} {path} {status} header {hn}", resolve(OPENAPI, hd)["schema"]))
    return found


class StaticContractTest(unittest.TestCase):
    """The documents against the source, without a server."""

    def test_routes_match_the_route_table(self):
        code, doc = api_routes(), doc_routes()
        self.assertEqual(sorted(code - doc), [], "routes in src/api.c missing from openapi.yaml")
        self.assertEqual(sorted(doc - code), [], "routes in openapi.yaml that src/api.c lacks")

    def test_every_schema_compiles(self):
        self.assertTrue(OPENAPI["openapi"].startswith("3.1."))
        for where, schema in openapi_schemas():
            with self.subTest(where=where):
                Draft202012Validator.check_schema(schema)
                validator(OPENAPI, schema).is_valid(None)  # resolves its $refs
        Draft202012Validator.check_schema(EVENTS)
        for name in EVENTS["$defs"]:
            validator(EVENTS, {"$ref": f"#/$defs/{name}"}).is_valid(None)

    def test_every_error_literal_in_the_code_is_documented(self):
        """api_respond_error(req, STATUS, "code", ...) anywhere in src/ and the canned bodies of
        http_parse.c: each fits a documented response of that status (some route)."""
        pairs = set()
        for name in os.listdir(SRC):
            if name.endswith(".c"):
                for st, code in re.findall(r'api_respond_error\(\s*\w+,\s*(\d+),\s*"(\w+)"', read_src(name)):
                    pairs.add((st, code))
        for name in os.listdir(SRC):  # the admin jobs' failures (admin_http.c job_reply: 503)
            if name.endswith(".c"):
                for code in re.findall(r'job_reply\([^,]+,[^,]+,[^,]+,\s*"(\w+)"', read_src(name)):
                    pairs.add(("503", code))
        for st, code in re.findall(r'case (\d+): return "\{\\"error\\":\\"(\w+)\\"\}"', read_src("http_parse.c")):
            pairs.add((st, code))
        pairs.add(("400", "invalid"))  # respond_invalid -> api_respond_bad_field(req, "invalid", ...)
        pairs.add(("400", "bad_request"))  # dlq.c replay_bad_request
        self.assertGreaterEqual(len(pairs), 20, pairs)
        schemas = {}
        for path, item in OPENAPI["paths"].items():
            for method, op in item.items():
                for st, r in op.get("responses", {}).items() if method in METHODS else []:
                    js = resolve(OPENAPI, r).get("content", {}).get("application/json")
                    if js:
                        schemas.setdefault(st, []).append(js["schema"])
        # 405 is the one component answered outside the paths
        schemas.setdefault("405", []).append(
            OPENAPI["components"]["responses"]["MethodNotAllowed"]["content"]["application/json"]["schema"])
        for st, code in sorted(pairs):
            with self.subTest(status=st, error=code):
                body = {"error": code, "message": "m"}
                ok = any(validator(OPENAPI, s).is_valid(body) or
                         validator(OPENAPI, s).is_valid({"error": code})
                         for s in schemas.get(st, []))
                self.assertTrue(ok, f"{st} {code!r} answered by src/ but documented nowhere")

    def test_asyncapi_points_into_the_event_schema(self):
        self.assertTrue(ASYNCAPI["asyncapi"].startswith("3."))
        self.assertEqual({c["address"] for c in ASYNCAPI["channels"].values()}, {TOPIC, DLQ})
        with open(os.path.join(DOCS, "asyncapi.yaml"), encoding="utf-8") as f:
            refs = re.findall(r"events\.schema\.json#(/[^\"'}\s,]+)", f.read())
        self.assertGreaterEqual(len(refs), 4)
        for ref in refs:
            with self.subTest(ref=ref):
                RefResolver("", EVENTS).resolve("#" + ref)
        kafka_names = read_src("kafka_common.h")
        for name in EVENTS["$defs"]["headers"]["required"]:
            self.assertTrue(f'"{name}"' in kafka_names, f"{name}: a CloudEvents header kafka_common.h does not name")
        # the one list of dlq_ header names, wherever the dead-letter writer keeps it
        defn = re.compile(r"dlq_header_names\[\w*\] = \{(.*?)\};", re.S)
        owners = [n for n in sorted(os.listdir(SRC)) if n.endswith((".c", ".h"))
                  and defn.search(read_src(n))]
        self.assertEqual(len(owners), 1, f"one definition of dlq_header_names: {owners}")
        macros = {}  # #define DLQ_H_X "dlq_x", wherever the names are spelled
        for n in os.listdir(SRC):
            if n.endswith((".c", ".h")):
                macros.update(re.findall(r'#define\s+(\w+)\s+"(dlq_\w+)"', read_src(n)))
        body = defn.search(read_src(owners[0])).group(1)
        names = [t.strip('"') if t.startswith('"') else macros.get(t, t)
                 for t in re.findall(r'"dlq_\w+"|\b[A-Z_][A-Z0-9_]*\b', body)]
        self.assertEqual(sorted(names), sorted(EVENTS["$defs"]["dlq_headers"]["required"]))
        # and spelled nowhere else: every other file uses dlq.h's DLQ_H_* or dlq_header_names
        spelled = [n for n in sorted(os.listdir(SRC)) if n.endswith((".c", ".h")) and n != "dlq.h"
                   and re.search(r'"dlq_(original_|consumer_|attempts"|error_)', read_src(n))]
        self.assertEqual(spelled, [], "dlq_* header names spelled outside dlq.h")


class LiveContractTest(h.TicketdTestCase):
    """Every route and every answer that can be provoked, validated against the documents."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.kafka = h.KafkaMock(partitions=2)
        cls.sink = FakeSink()
        cls.td = h.Ticketd(cls.pg, cls.kafka.brokers, env={
            "DATA_PLATFORM_URL": cls.sink.url, "CONSUMER_GROUP": h.unique_group("contracts"),
            "RETRY_BACKOFF": "200ms", "RETRY_MAX_ATTEMPTS": "2", "RELAY_INTERVAL": "200ms",
            "MAX_BODY_BYTES": "4096", "MAX_HEADER_BYTES": "4096",
            "KAFKA_CONFIG": "session.timeout.ms=6000,heartbeat.interval.ms=500"})
        cls.seen = set()

    @classmethod
    def tearDownClass(cls):
        cls.td.close()
        cls.sink.close()
        cls.kafka.close()
        super().tearDownClass()

    # ------------------------------------------------------------------ the one check

    def check(self, method, template, r, response=None):
        """r must be a documented answer of (method, template) (or the named component
        response): status listed, required headers present, documented headers and the body
        valid. Returns the parsed body."""
        if response is None:
            op = OPENAPI["paths"][template][method.lower()]
            self.assertTrue(str(r.status) in op["responses"],
                            f"{method} {template} answered {r.status}, which openapi.yaml does not list"
                            f" (it lists {sorted(op['responses'])}): {r.body[:300]!r}")
            spec = resolve(OPENAPI, op["responses"][str(r.status)])
        else:
            spec = OPENAPI["components"]["responses"][response]
        where = f"{method} {template} {r.status}"
        for name, hd in spec.get("headers", {}).items():
            hd = resolve(OPENAPI, hd)
            value = r.headers.get(name.lower())
            if hd.get("required"):
                self.assertIsNotNone(value, f"{where}: header {name} missing")
            if value is not None:
                errors = [e.message for e in validator(OPENAPI, hd["schema"]).iter_errors(value)]
                self.assertEqual(errors, [], f"{where}: header {name}: {value!r}")
        ctype = r.headers.get("content-type", "")
        content = spec.get("content", {})
        media = ctype if ctype in content else ctype.split(";")[0].strip()
        self.assertIn(media, content, f"{where}: Content-Type {ctype!r} not documented ({list(content)})")
        body = r.json() if media == "application/json" else r.body.decode("utf-8")
        errors = [f"{list(e.absolute_path)}: {e.message}"
                  for e in validator(OPENAPI, content[media]["schema"]).iter_errors(body)]
        self.assertEqual(errors, [], f"{where}: body {str(body)[:400]}")
        self.seen.add((method, template, r.status))
        return body

    def admin(self, path, method="GET", json_body=None, td=None, token=h.ADMIN_TOKEN):
        return (td or self.td).admin(method, path, json=json_body, token=token)

    def apply_body(self, i, **kw):
        b = {"event_id": "contracts-2026", "phone": h.phone_for(i), "name": f"Applicant {i}"}
        b.update(kw)
        return b

    def post(self, body, headers=None, raw=None):
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        data = raw if raw is not None else json.dumps(body)
        return self.td.request("POST", "/v1/applications", body=data, headers=hdrs)

    # ------------------------------------------------------------------ tests (in order)

    def test_1_public_api(self):
        A = "/v1/applications"
        created = self.check("POST", A, self.post(self.apply_body(1, email="a1@example.com", seats=2)))
        self.assertEqual(created["status"], "applied")
        # Idempotency-Key: first 201, the replay 201 with Idempotent-Replayed, another body 422
        key = {"Idempotency-Key": f"contracts-{uuid.uuid4()}"}
        first = self.post(self.apply_body(2), key)
        self.check("POST", A, first)
        self.assertNotIn("idempotent-replayed", first.headers)
        replay = self.post(self.apply_body(2), key)
        self.assertEqual(replay.status, 201, replay)
        self.check("POST", A, replay)
        self.assertEqual(replay.headers.get("idempotent-replayed"), "true")
        self.assertEqual(replay.json(), first.json())
        r = self.post(self.apply_body(3), key)
        self.assertEqual(r.status, 422, r)
        self.check("POST", A, r)
        r = self.post(self.apply_body(1))
        self.assertEqual((r.status, r.json()["error"]), (409, "already_applied"), r)
        self.check("POST", A, r)
        for bad in (self.apply_body(4, phone="12345"), self.apply_body(4, seats=9), {"event_id": "x"}):
            r = self.post(bad)
            self.assertEqual(r.status, 400, r)
            self.assertIn("field", self.check("POST", A, r))
        r = self.post(self.apply_body(4), {"Idempotency-Key": "k" * 200})
        self.assertEqual((r.status, r.json().get("field")), (400, "Idempotency-Key"), r)
        self.check("POST", A, r)
        r = self.post(None, {"Content-Type": "text/plain"}, raw="event_id=x")
        self.assertEqual(r.status, 415, r)
        self.check("POST", A, r)
        r = self.post(None, raw=json.dumps(self.apply_body(5, name="x" * 5000)))
        self.assertEqual(r.status, 413, r)
        self.check("POST", A, r)
        r = self.td.request("POST", A, json=self.apply_body(6), headers={"X-Big": "y" * 5000})
        self.assertEqual(r.status, 431, r)
        self.check("POST", A, r)
        raw = h.raw_exchange(self.td.port, b"POST /v1/applications HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
        r = h.parse_responses(raw)[0]
        self.assertEqual(r.status, 400, r)
        self.check("POST", A, r)

        # status by reference: 200, 404 (malformed, unknown)
        T = "/v1/applications/{reference}"
        st = self.check("GET", T, self.td.request("GET", f"{A}/{created['reference']}"))
        self.assertEqual((st["reference"], st["phone"], st["seats"]), (created["reference"], "010-****-0001", 2))
        for ref in ("not-a-uuid", str(uuid.uuid4()), "1"):
            r = self.td.request("GET", f"{A}/{ref}")
            self.assertEqual(r.status, 404, r)
            self.check("GET", T, r)

        # another method on a known path: 405 with Allow; an unknown path: 404
        r = self.td.request("GET", A)
        self.assertEqual(r.status, 405, r)
        self.check("GET", A, r, response="MethodNotAllowed")
        self.assertEqual(r.headers["allow"], "POST")
        r = self.td.request("DELETE", f"{A}/{created['reference']}")
        self.assertEqual((r.status, r.headers.get("allow")), (405, "GET"), r)
        self.check("DELETE", T, r, response="MethodNotAllowed")
        r = self.td.request("GET", "/v2/nothing")
        self.assertEqual(r.status, 404, r)
        self.check("GET", "/v2/nothing", r, response="NotFound")

        for path in ("/healthz", "/readyz", "/metrics"):
            r = self.td.request("GET", path)
            self.assertEqual(r.status, 200, r)
            self.check("GET", path, r)

    def test_2_events_on_the_topic(self):
        n = self.pg.count("applications")
        self.assertGreaterEqual(n, 2)
        msgs = h.kcat_consume(self.kafka.brokers, TOPIC, expect=n)
        self.assertEqual(len(msgs), n, msgs)
        v = validator(EVENTS, EVENTS)
        ids = set()
        for m in msgs:
            record = {"key": m["key"], "value": json.loads(m["value"]), "headers": m["headers"]}
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(record)]
            self.assertEqual(errors, [], record)
            self.assertEqual(record["key"], str(record["value"]["id"]))
            ids.add(record["headers"]["ce_id"])
        self.assertEqual(ids, {r[0] for r in self.pg.query("SELECT event_id FROM outbox")})

    def test_3_admin_routes(self):
        ref = self.pg.scalar("SELECT reference FROM applications WHERE id = 1")
        app_id = int(self.pg.scalar(f"SELECT id FROM applications WHERE reference = '{ref}'"))
        L, I = "/admin/applications", "/admin/applications/{id}"
        # 401 without or with a wrong token, on every admin route
        for template, path, method in ((L, f"{L}?event_id=contracts-2026&phone=010-0000-0001", "GET"),
                                       (I, f"{L}/{app_id}", "GET"), ("/admin/audit", "/admin/audit", "GET"),
                                       ("/admin/trace", "/admin/trace?phone=010-0000-0001", "GET"),
                                       ("/admin/dlq", "/admin/dlq", "GET"),
                                       ("/admin/dlq/replay", "/admin/dlq/replay", "POST"),
                                       ("/admin/report", "/admin/report?event_id=contracts-2026", "GET")):
            for token in (None, "wrong-token"):
                r = self.admin(path, method, {"all": True} if method == "POST" else None, token=token)
                self.assertEqual(r.status, 401, f"{path} {token}: {r}")
                self.check(method, template, r)

        found = self.check("GET", L, self.admin(f"{L}?event_id=contracts-2026&phone=010-0000-0001"))
        self.assertEqual([a["id"] for a in found["applications"]], [app_id])
        none = self.check("GET", L, self.admin(f"{L}?event_id=contracts-2026&phone=010-9999-9999"))
        self.assertEqual(none["applications"], [])
        for q in ("?phone=010-0000-0001", "?event_id=contracts-2026&phone=123", ""):
            r = self.admin(L + q)
            self.assertEqual(r.status, 400, r)
            self.check("GET", L, r)
        rec = h.wait_until(lambda: (lambda b: b["status"] == "processed" and b)(
            self.check("GET", I, self.admin(f"{L}/{app_id}"))), timeout=60, what="application 1 processed")
        self.assertEqual(rec["reference"], ref)
        for bad in ("999999", "0", "abc"):
            r = self.admin(f"{L}/{bad}")
            self.assertEqual(r.status, 404, r)
            self.check("GET", I, r)

        audit = self.check("GET", "/admin/audit", self.admin("/admin/audit?event_id=contracts-2026"))
        self.assertGreaterEqual(audit["applications"], 2)
        r = self.admin("/admin/audit?event_id=bad%20id")
        self.assertEqual(r.status, 400, r)
        self.check("GET", "/admin/audit", r)
        self.check("GET", "/admin/trace", self.admin("/admin/trace?phone=010-0000-0001"))
        r = self.admin("/admin/trace?phone=nope")
        self.assertEqual(r.status, 400, r)
        self.check("GET", "/admin/trace", r)
        html = self.check("GET", "/admin/report", self.admin("/admin/report?event_id=contracts-2026"))
        self.assertIn("contracts-2026", html)
        r = self.admin("/admin/report")
        self.assertEqual(r.status, 400, r)
        self.check("GET", "/admin/report", r)
        self.check("GET", "/admin/dlq", self.admin("/admin/dlq?limit=5"))
        r = self.admin("/admin/dlq?limit=0")
        self.assertEqual(r.status, 400, r)
        self.check("GET", "/admin/dlq", r)
        for body in ({"all": False}, {"event_id": "x"}, {"eventid": str(uuid.uuid4())}):
            r = self.admin("/admin/dlq/replay", "POST", body)
            self.assertEqual(r.status, 400, r)
            self.assertIn("field", self.check("POST", "/admin/dlq/replay", r))

    def test_4_dead_letter_and_replay(self):
        victim = h.phone_for(77)
        self.sink.fail_matching(victim.replace("-", ""))
        created = self.check("POST", "/v1/applications", self.post(self.apply_body(77)))
        dlq = h.kcat_consume(self.kafka.brokers, DLQ, expect=1, timeout=90)
        self.assertEqual(len(dlq), 1, dlq)
        m = dlq[0]
        record = {"key": m["key"], "value": json.loads(m["value"]), "headers": m["headers"]}
        for ref, inst in (("#/$defs/dlq_record", record), ("#/$defs/value", record["value"]),
                          ("#/$defs/headers", record["headers"])):
            errors = [f"{list(e.absolute_path)}: {e.message}"
                      for e in validator(EVENTS, {"$ref": ref}).iter_errors(inst)]
            self.assertEqual(errors, [], f"{ref}: {inst}")
        self.assertEqual(m["headers"]["dlq_error_class"], "sink_status")
        self.assertEqual(m["headers"]["dlq_original_topic"], TOPIC)
        self.assertEqual(record["value"]["phone"], victim.replace("-", ""))
        ce_id = m["headers"]["ce_id"]

        app_id = int(self.pg.scalar(f"SELECT id FROM applications WHERE reference = '{created['reference']}'"))
        rec = h.wait_until(lambda: (lambda b: b["status"] == "dead_lettered" and b)(
            self.check("GET", "/admin/applications/{id}", self.admin(f"/admin/applications/{app_id}"))),
            timeout=60, what="victim dead_lettered")
        self.assertIsNotNone(rec["dead_letter"])
        st = self.check("GET", "/v1/applications/{reference}",
                        self.td.request("GET", f"/v1/applications/{created['reference']}"))
        self.assertEqual(st["status"], "dead_lettered")
        listed = h.wait_until(lambda: (lambda b: b["dead_letters"] and b["dead_letters"][0]["dead_lettered_at"] and b)(
            self.check("GET", "/admin/dlq", self.admin("/admin/dlq"))), timeout=30, what="dlq listed with its row")
        self.assertEqual(listed["dead_letters"][0]["event_id"], ce_id)
        self.sink.ok()
        done = self.check("POST", "/admin/dlq/replay", self.admin("/admin/dlq/replay", "POST", {"event_id": ce_id}))
        self.assertEqual(done, {"replayed": 1, "skipped": 0, "failed": 0})
        again = self.check("POST", "/admin/dlq/replay", self.admin("/admin/dlq/replay", "POST", {"all": True}))
        self.assertEqual(again["replayed"], 0)
        listed = self.check("GET", "/admin/dlq", self.admin("/admin/dlq"))
        self.assertTrue(listed["dead_letters"][0]["replayed"])
        # the replayed copy on the source topic is still a valid event with the same ce_id
        msgs = h.kcat_consume(self.kafka.brokers, TOPIC, expect=self.pg.count("applications") + 1)
        copies = [x for x in msgs if x["headers"].get("ce_id") == ce_id]
        self.assertEqual(len(copies), 2, copies)
        for c in copies:
            record = {"key": c["key"], "value": json.loads(c["value"]), "headers": c["headers"]}
            self.assertTrue(validator(EVENTS, EVENTS).is_valid(record), record)

    def test_5_admin_disabled_and_not_ready(self):
        """A second replica with no ADMIN_TOKEN (403 on every admin route) and brokers nobody
        answers on (/readyz 503 with its reason; all roles: ROLE=api does not wait for Kafka)."""
        dead = f"127.0.0.1:{h.free_port()}"
        other = self.track(h.Ticketd(self.pg, dead, env={"ADMIN_TOKEN": "", "CONSUMER_GROUP": h.unique_group("noadmin")},
                                     ready=False, name="ticketd-noadmin"))
        for template, path, method in (("/admin/applications", "/admin/applications?event_id=e&phone=010-0000-0001", "GET"),
                                       ("/admin/applications/{id}", "/admin/applications/1", "GET"),
                                       ("/admin/audit", "/admin/audit", "GET"), ("/admin/trace", "/admin/trace", "GET"),
                                       ("/admin/dlq", "/admin/dlq", "GET"), ("/admin/dlq/replay", "/admin/dlq/replay", "POST"),
                                       ("/admin/report", "/admin/report", "GET")):
            r = other.admin(method, path, json={"all": True} if method == "POST" else None)
            self.assertEqual(r.status, 403, f"{path}: {r}")
            self.check(method, template, r)
        r = other.request("GET", "/readyz")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.check("GET", "/readyz", r)["reason"], "kafka")

    def test_6_database_down(self):
        """503 with Retry-After on the routes that need PostgreSQL, and /readyz says why."""
        self.pg.stop()
        try:
            h.wait_until(lambda: self.td.request("GET", "/readyz").status == 503, timeout=60,
                         what="/readyz 503 with the database stopped")
            self.assertEqual(self.check("GET", "/readyz", self.td.request("GET", "/readyz"))["reason"], "database")
            r = self.post(self.apply_body(90))
            self.assertEqual((r.status, r.json()["error"]), (503, "unavailable"), r)
            self.check("POST", "/v1/applications", r)
            r = self.td.request("GET", f"/v1/applications/{uuid.uuid4()}")
            self.assertEqual(r.status, 503, r)
            self.check("GET", "/v1/applications/{reference}", r)
            r = self.admin("/admin/applications/1")
            self.assertEqual(r.status, 503, r)
            self.check("GET", "/admin/applications/{id}", r)
            # A report that fails in its worker thread (job_reply) says when to retry too.
            r = self.admin("/admin/audit?event_id=contracts-2026")
            self.assertEqual((r.status, r.json()["error"]), (503, "audit_failed"), r)
            self.check("GET", "/admin/audit", r)
        finally:
            self.pg.start()
        self.td.wait_ready(60)

    def test_7_every_route_was_exercised(self):
        """So that a route added to the document and the code gets a live check here too."""
        exercised = {(m.lower(), t) for m, t, _ in self.seen}
        for path, item in OPENAPI["paths"].items():
            for method in item:
                if method in METHODS:
                    self.assertIn((method, path), exercised, f"{method.upper()} {path} never checked live")


if __name__ == "__main__":
    unittest.main(verbosity=2)
