"""GET /metrics: valid Prometheus text format, conventional names, the series issue 7 names,
and counts that move with the traffic.

A service runs with the in-process Kafka mock and a test data-platform sink that answers
500 to events of one event id (they are retried, then dead-lettered) and 200 to the rest.
Every line of the exposition is parsed strictly (HELP/TYPE/sample grammar, one group per
family, histogram buckets cumulative and consistent). Then: N new applications raise the
201 counter by exactly N and the group-commit batch-size sum by N; duplicates and bad
bodies raise 409 and 400; the relay's published counter rises by the rows it published;
the consumer's processed/retry/DLQ/sink-failure counters agree with the DB; backlog, age
and lag gauges return to 0.

FirstScrape (issue 16): `promtool check metrics` (Debian's prometheus package) accepts the
exposition of a process that has just started and of one under load, and every series
without labels that a busy process exposes is already in a fresh process's first scrape
(an alert on ticketd_outbox_backlog must not see "no data" on a new pod).

EXPECTED_SERIES below is the one list of the series issue 7 asks for, with the module
that owns each: test_expected_series_exist fails naming every one that is missing.
"""
import http.server
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# (what issue 7 asks for, family name (regex), type, label names it must carry, owner)
EXPECTED_SERIES = [
    ("requests by route and status", r"ticketd_http_requests_total", "counter",
     {"route", "code"}, "api.c"),
    ("request latency histogram", r"ticketd_http_request_duration_seconds", "histogram",
     {"route"}, "api.c"),
    ("group-commit batch sizes", r"ticketd_group_commit_batch_size", "histogram", set(),
     "ingest.c"),
    ("DB pool state: connections ready", r"ticketd_db_connections", "gauge", {"pool"},
     "db_pool.c"),
    ("DB pool state: connections idle", r"ticketd_db_pool_idle_connections", "gauge", {"pool"},
     "main.c"),
    ("outbox backlog", r"ticketd_outbox_backlog", "gauge", set(), "outbox_relay.c"),
    ("oldest unpublished outbox row age", r"ticketd_outbox_oldest_unpublished(_age)?_seconds",
     "gauge", set(), "outbox_relay.c"),
    ("relay publish rate", r"ticketd_relay_published_total", "counter", set(),
     "outbox_relay.c"),
    ("relay failures", r"ticketd_relay_failures_total", "counter", set(), "outbox_relay.c"),
    ("consumer lag per partition", r"ticketd_consumer_lag", "gauge", {"partition"},
     "consumer.c"),
    ("consumer retries", r"ticketd_consumer_retries_total", "counter", set(), "consumer.c"),
    ("DLQ count", r"ticketd_dlq_produced_total", "counter", set(), "consumer.c"),
    ("sink failures", r"ticketd_sink_failures_total", "counter", {"effect"}, "effects.c"),
]

FAILING_EVENT = "metrics-dlq"   # the sink answers 500 to these
OK_EVENT = "metrics-ok"
RETRY_MAX_ATTEMPTS = 2
DB_POOL = 3

# --------------------------------------------------------------------------- parser

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
SAMPLE_RE = re.compile(rf"^({METRIC_NAME})(\{{.*\}})?[ \t]+(\S+)(?:[ \t]+(-?\d+))?$")
LABEL_RE = re.compile(rf'\s*({LABEL_NAME})="((?:[^"\\\n]|\\["\\n])*)"\s*(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ExpositionError(AssertionError):
    pass


def parse_labels(text, lineno):
    """'{a="1",b="x\\"y"}' -> {'a': '1', 'b': 'x"y'}"""
    inner = text[1:-1]
    labels, pos = {}, 0
    while pos < len(inner):
        m = LABEL_RE.match(inner, pos)
        if not m or m.end() == pos:
            raise ExpositionError(f"line {lineno}: bad label set {text!r}")
        name, raw = m.group(1), m.group(2)
        if name in labels:
            raise ExpositionError(f"line {lineno}: label {name} twice")
        labels[name] = raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        pos = m.end()
        if m.group(3) == "" and pos < len(inner):
            raise ExpositionError(f"line {lineno}: bad label set {text!r}")
    return labels


def parse_value(text, lineno):
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise ExpositionError(f"line {lineno}: bad value {text!r}")
    return float(text)


def family_of(sample_name, families):
    """The family a sample belongs to (histogram/summary suffixes)."""
    if sample_name in families:
        return sample_name
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix):
            base = sample_name[: -len(suffix)]
            if base in families and families[base]["type"] in ("histogram", "summary"):
                return base
    return sample_name


def parse_exposition(text):
    """Strict parse of the Prometheus text format (0.0.4). Returns
    {family: {'type', 'help', 'samples': [(sample name, labels, value)]}}."""
    if text and not text.endswith("\n"):
        raise ExpositionError("exposition must end with a newline")
    families, order, closed = {}, [], set()
    current = None
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if line.strip() == "":
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 2 and parts[1] in ("HELP", "TYPE"):
                if len(parts) < 3 or not re.fullmatch(METRIC_NAME, parts[2]):
                    raise ExpositionError(f"line {lineno}: bad {parts[1]} line {line!r}")
                name = parts[2]
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if name in closed or (fam["samples"] and current != name):
                    raise ExpositionError(f"line {lineno}: {parts[1]} for {name} after its samples")
                if parts[1] == "TYPE":
                    if fam["type"] is not None:
                        raise ExpositionError(f"line {lineno}: second TYPE for {name}")
                    if len(parts) != 4 or parts[3] not in TYPES:
                        raise ExpositionError(f"line {lineno}: bad type in {line!r}")
                    fam["type"] = parts[3]
                else:
                    if fam["help"] is not None:
                        raise ExpositionError(f"line {lineno}: second HELP for {name}")
                    fam["help"] = parts[3] if len(parts) == 4 else ""
                if current != name:
                    if current is not None:
                        closed.add(current)
                    current = name
                    if name not in order:
                        order.append(name)
            continue  # other comments are allowed
        m = SAMPLE_RE.match(line)
        if not m:
            raise ExpositionError(f"line {lineno}: not a sample line: {line!r}")
        sname, ltext, vtext = m.group(1), m.group(2), m.group(3)
        labels = parse_labels(ltext, lineno) if ltext else {}
        value = parse_value(vtext, lineno)
        fname = family_of(sname, families)
        fam = families.setdefault(fname, {"type": None, "help": None, "samples": []})
        if fname != current:
            if fname in closed or fam["samples"]:
                raise ExpositionError(f"line {lineno}: samples of {fname} are not one group")
            if current is not None:
                closed.add(current)
            current = fname
            order.append(fname)
        for s in fam["samples"]:
            if s[0] == sname and s[1] == labels:
                raise ExpositionError(f"line {lineno}: duplicate sample {sname}{labels}")
        fam["samples"].append((sname, labels, value))
    for name, fam in families.items():
        if fam["type"] == "histogram":
            check_histogram(name, fam)
    return families


def check_histogram(name, fam):
    series = {}
    for sname, labels, value in fam["samples"]:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        s = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            if "le" not in labels:
                raise ExpositionError(f"{name}: bucket without le")
            s["buckets"].append((parse_value(labels["le"], 0), value))
        elif sname == name + "_sum":
            s["sum"] = value
        elif sname == name + "_count":
            s["count"] = value
        else:
            raise ExpositionError(f"{name}: unexpected sample {sname} in a histogram")
    for key, s in series.items():
        les = [le for le, _ in s["buckets"]]
        counts = [c for _, c in s["buckets"]]
        if not les or les[-1] != math.inf:
            raise ExpositionError(f"{name}{dict(key)}: no +Inf bucket")
        if les != sorted(les) or len(set(les)) != len(les):
            raise ExpositionError(f"{name}{dict(key)}: le not increasing")
        if counts != sorted(counts):
            raise ExpositionError(f"{name}{dict(key)}: buckets not cumulative")
        if s["count"] is None or s["sum"] is None:
            raise ExpositionError(f"{name}{dict(key)}: _sum or _count missing")
        if counts[-1] != s["count"]:
            raise ExpositionError(f"{name}{dict(key)}: +Inf bucket {counts[-1]} != count {s['count']}")


def convention_problems(families):
    """Names and types against the Prometheus naming conventions."""
    problems = []
    for name, fam in families.items():
        t = fam["type"]
        if not name.startswith("ticketd_"):
            problems.append(f"{name}: no ticketd_ prefix")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or "__" in name:
            problems.append(f"{name}: not lower snake_case")
        if t is None:
            problems.append(f"{name}: no TYPE line")
        if t == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: counter without _total")
        if t != "counter" and name.endswith("_total"):
            problems.append(f"{name}: {t} named _total")
        if re.search(r"_(ms|msec|millis|milliseconds|us|usec|microseconds|ns|nanoseconds|"
                     r"minutes|hours)(_|$)", name):
            problems.append(f"{name}: time not in base unit seconds")
        timeish = re.search(r"(duration|latency|_age|_time|elapsed|delay|_wait)", name)
        if timeish and t in ("histogram", "gauge", "summary") and not name.endswith("_seconds"):
            problems.append(f"{name}: a duration without the _seconds unit")
        for _, labels, _ in fam["samples"]:
            for label in labels:
                if label.startswith("__") or not re.fullmatch(r"[a-z][a-z0-9_]*", label):
                    problems.append(f"{name}: label name {label!r}")
    return problems


def value(families, name, **labels):
    """Sum of the samples named name (a sample name, e.g. X_count) whose labels include
    labels; 0 when there is none."""
    fam = families.get(family_of(name, families)) or {"samples": []}
    total = 0.0
    for sname, ls, v in fam["samples"]:
        if sname == name and all(ls.get(k) == str(val) for k, val in labels.items()):
            total += v
    return total


# --------------------------------------------------------------------------- test sink

class Sink:
    """The data platform: 500 for events of FAILING_EVENT, 200 for the rest."""

    def __init__(self):
        self.received = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.received.append(body)
                code = 500 if FAILING_EVENT.encode() in body else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- tests

class ParserSelfTest(unittest.TestCase):
    """The parser rejects what it must (so the real checks can fail)."""

    GOOD = ('# HELP ticketd_x_total X.\n# TYPE ticketd_x_total counter\n'
            'ticketd_x_total{route="a",code="201"} 3\n'
            '# TYPE ticketd_h_seconds histogram\n'
            'ticketd_h_seconds_bucket{le="0.1"} 1\nticketd_h_seconds_bucket{le="+Inf"} 2\n'
            'ticketd_h_seconds_sum 0.3\nticketd_h_seconds_count 2\n')

    def test_parser(self):
        f = parse_exposition(self.GOOD)
        self.assertEqual(value(f, "ticketd_x_total", code=201), 3)
        self.assertEqual(value(f, "ticketd_h_seconds_count"), 2)
        self.assertEqual(convention_problems(f), [])
        bad = [
            "ticketd_x_total{route=\"a\" 3\n",                       # label set
            "ticketd_x_total three\n",                              # value
            "# TYPE ticketd_x_total countr\nticketd_x_total 1\n",   # type
            "ticketd_a 1\nticketd_b 1\nticketd_a 2\n",               # groups
            "ticketd_a 1\nticketd_a 2\n",                            # duplicate
            "# TYPE ticketd_h histogram\nticketd_h_bucket{le=\"1\"} 2\n"
            "ticketd_h_bucket{le=\"+Inf\"} 1\nticketd_h_sum 1\nticketd_h_count 1\n",
            "ticketd_a 1",                                           # no final newline
        ]
        for text in bad:
            with self.assertRaises(ExpositionError, msg=text):
                parse_exposition(text)
        f = parse_exposition("# TYPE x_requests counter\nx_requests 1\n"
                             "# TYPE ticketd_lat_ms histogram\nticketd_lat_ms_bucket{le=\"+Inf\"} 0\n"
                             "ticketd_lat_ms_sum 0\nticketd_lat_ms_count 0\n")
        problems = convention_problems(f)
        self.assertEqual(len(problems), 3, problems)  # no prefix, no _total, _ms
        f = parse_exposition("# TYPE ticketd_wait_duration gauge\nticketd_wait_duration 1\n"
                             "# TYPE ticketd_up_total gauge\nticketd_up_total{Bad=\"1\"} 1\n")
        self.assertEqual(len(convention_problems(f)), 3)  # no _seconds, gauge _total, label


class MetricsEndpoint(harness.TicketdTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sink = Sink()
        cls.t = harness.Ticketd(cls.pg, env={
            "DATA_PLATFORM_URL": cls.sink.url, "RETRY_MAX_ATTEMPTS": str(RETRY_MAX_ATTEMPTS),
            "RETRY_BACKOFF": "100ms", "DB_POOL": str(DB_POOL), "KAFKA_PARTITIONS": "4",
            "CONSUMER_GROUP": harness.unique_group("metrics")})
        cls.next_phone = 0

    @classmethod
    def tearDownClass(cls):
        cls.t.close()
        cls.sink.close()
        super().tearDownClass()

    relay_built = os.path.exists(os.path.join(harness.SOURCE_DIR, "src", "outbox_relay.c"))
    consumer_built = os.path.exists(os.path.join(harness.SOURCE_DIR, "src", "consumer.c"))

    def scrape(self):
        r = self.t.request("GET", "/metrics")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.headers.get("content-type", "").startswith("text/plain"),
                        r.headers.get("content-type"))
        return parse_exposition(r.body.decode("utf-8"))

    def phones(self, n):
        cls = type(self)
        out = [harness.phone_for(7_000_000 + cls.next_phone + i) for i in range(n)]
        cls.next_phone += n
        return out

    def apply_all(self, event, phones):
        statuses = harness.parallel(lambda p: self.t.apply(event_id=event, phone=p).status,
                                    phones, workers=8)
        self.assertEqual(statuses, [201] * len(phones))

    def quiesce(self, consumer=False):
        """Waits until every outbox row is published (and, with consumer=True, handled:
        processed or dead-lettered)."""
        if self.relay_built:
            harness.wait_until(lambda: self.pg.count("outbox_status WHERE published_at IS NULL") == 0,
                               timeout=60, what="every outbox row published")
        if consumer and self.consumer_built:
            harness.wait_until(lambda: self.pg.unfinished_events() == 0, timeout=60,
                               what="every event processed or dead-lettered")

    def some_traffic(self):
        self.apply_all(OK_EVENT, self.phones(3))
        self.t.request("GET", "/no/such/path")
        self.t.request("POST", "/v1/applications", json={"event_id": OK_EVENT})

    def test_exposition_format_and_naming(self):
        self.some_traffic()
        families = self.scrape()
        self.assertTrue(families)
        self.assertEqual(convention_problems(families), [])

    def test_every_family_has_help(self):
        self.some_traffic()
        families = self.scrape()
        self.assertEqual(sorted(n for n, f in families.items() if not f["help"]), [],
                         "families without a HELP text (metrics_describe)")

    def test_expected_series_exist(self):
        self.some_traffic()
        self.apply_all(FAILING_EVENT, self.phones(1))
        try:
            self.quiesce(consumer=True)
        except AssertionError as e:  # still list what exists; the consumer test says why
            print(f"test_expected_series_exist: {e}", file=sys.stderr)
        families = self.scrape()
        missing = []
        for what, pattern, mtype, labels, owner in EXPECTED_SERIES:
            found = [n for n in families if re.fullmatch(pattern, n)]
            if not found:
                missing.append(f"{what}: no family matching {pattern} (owner: {owner})")
                continue
            fam = families[found[0]]
            if fam["type"] != mtype:
                missing.append(f"{what}: {found[0]} is {fam['type']}, want {mtype} (owner: {owner})")
            have = set().union(*[set(ls) for _, ls, _ in fam["samples"]]) if fam["samples"] else set()
            if not fam["samples"]:
                missing.append(f"{what}: {found[0]} has no samples (owner: {owner})")
            elif labels - have:
                missing.append(f"{what}: {found[0]} lacks labels {sorted(labels - have)} "
                               f"(owner: {owner})")
        self.assertEqual(missing, [], "series issue 7 asks for:\n  " + "\n  ".join(missing))

    def test_request_counters_move_with_the_traffic(self):
        self.quiesce()
        before = self.scrape()
        n, new = 7, self.phones(7)
        self.apply_all(OK_EVENT, new)
        dups = harness.parallel(lambda p: self.t.apply(event_id=OK_EVENT, phone=p).status,
                                new[:3], workers=3)
        self.assertEqual(dups, [409] * 3)
        for body in ({"event_id": OK_EVENT}, {"event_id": OK_EVENT, "phone": "12", "name": "x"}):
            self.assertEqual(self.t.request("POST", "/v1/applications", json=body).status, 400)
        after = self.scrape()

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(delta("ticketd_http_requests_total", route="apply", code=201), n)
        self.assertEqual(delta("ticketd_http_requests_total", route="apply", code=409), 3)
        self.assertEqual(delta("ticketd_http_requests_total", route="apply", code=400), 2)
        self.assertEqual(delta("ticketd_http_request_duration_seconds_count", route="apply"),
                         n + 3 + 2)
        self.assertGreater(delta("ticketd_http_request_duration_seconds_sum", route="apply"), 0)
        # Each new application is written by exactly one group commit (the 409s may be
        # answered from a lookup instead, so only the 7 new ones are counted here).
        self.assertGreaterEqual(delta("ticketd_group_commit_batch_size_sum"), n)
        self.assertLessEqual(delta("ticketd_group_commit_batch_size_sum"), n + 3)
        self.assertGreaterEqual(delta("ticketd_group_commit_batch_size_count"), 1)
        # The API pool: DB_POOL connections, all ready, all idle once the traffic is done.
        self.assertEqual(value(after, "ticketd_db_connections", pool="api"), DB_POOL)
        harness.wait_until(lambda: value(self.scrape(), "ticketd_db_pool_idle_connections",
                                         pool="api") == DB_POOL, timeout=10,
                           what="every API connection idle")

    @unittest.skipUnless(relay_built, "no src/outbox_relay.c yet")
    def test_relay_series_move(self):
        self.quiesce()
        before = self.scrape()
        k = 5
        self.apply_all(OK_EVENT, self.phones(k))
        self.quiesce()
        after = harness.wait_until(
            lambda: (lambda f: f if value(f, "ticketd_outbox_backlog") == 0 else None)(self.scrape()),
            timeout=30, what="ticketd_outbox_backlog back to 0")
        self.assertEqual(value(after, "ticketd_relay_published_total") -
                         value(before, "ticketd_relay_published_total"), k)
        self.assertEqual(value(after, "ticketd_relay_failures_total") -
                         value(before, "ticketd_relay_failures_total"), 0)
        self.assertEqual(self.pg.count("outbox_status WHERE published_at IS NULL"), 0)
        age = [n for n in after if re.fullmatch(r"ticketd_outbox_oldest_unpublished(_age)?_seconds", n)]
        self.assertTrue(age, "no oldest-unpublished-age gauge (outbox_relay.c)")
        self.assertEqual(value(after, age[0]), 0)

    @unittest.skipUnless(consumer_built, "no src/consumer.c yet")
    def test_consumer_series_move(self):
        self.quiesce(consumer=True)
        before = self.scrape()
        good, bad = self.phones(4), self.phones(2)
        self.apply_all(OK_EVENT, good)
        self.apply_all(FAILING_EVENT, bad)
        self.quiesce(consumer=True)
        dead = self.pg.count(f"dead_letters d JOIN applications a ON a.id = d.application_id "
                             f"WHERE a.event_id = '{FAILING_EVENT}' AND a.phone IN "
                             f"({','.join(repr(p.replace('-', '')) for p in bad)})")
        self.assertEqual(dead, len(bad), "the failing events are not dead-lettered in the DB")

        def lag_zero():
            f = self.scrape()
            lags = [v for s, ls, v in f.get("ticketd_consumer_lag", {"samples": []})["samples"]]
            return f if lags and all(v == 0 for v in lags) else None

        after = harness.wait_until(lag_zero, timeout=30, what="ticketd_consumer_lag all 0")

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(delta("ticketd_dlq_produced_total"), len(bad))
        self.assertGreaterEqual(delta("ticketd_consumer_processed_total"), len(good))
        self.assertGreaterEqual(delta("ticketd_consumer_retries_total"),
                                len(bad) * (RETRY_MAX_ATTEMPTS - 1))
        self.assertGreaterEqual(delta("ticketd_sink_failures_total", effect="data_platform"),
                                len(bad) * RETRY_MAX_ATTEMPTS)
        self.assertEqual(delta("ticketd_sink_failures_total", effect="points"), 0)
        partitions = {ls.get("partition") for _, ls, _ in after["ticketd_consumer_lag"]["samples"]}
        used = {p for (p,) in self.pg.query("SELECT DISTINCT kafka_partition FROM outbox_status")}
        self.assertLessEqual(used, partitions, "lag of every partition that got events")
        self.assertLessEqual(partitions, {str(p) for p in range(4)})


def promtool_problems(text):
    """`promtool check metrics` on an exposition: '' when it passes, else its complaints."""
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    return "" if r.returncode == 0 else (r.stdout + r.stderr).strip() or f"exit {r.returncode}"


def label_less_samples(families):
    """Sample names that carry no labels (histogram buckets always carry le)."""
    return {sname for fam in families.values() for sname, labels, _ in fam["samples"]
            if not labels}


@unittest.skipUnless(shutil.which("promtool"), "promtool not installed (Debian package prometheus)")
class FirstScrape(harness.TicketdTestCase):
    """A fresh process, scraped as soon as it answers, then under load and when quiet."""

    def test_first_scrape_has_every_label_less_series_and_promtool_accepts_it(self):
        t = self.track(harness.Ticketd(self.pg, ready=False, env={
            "KAFKA_PARTITIONS": "4", "CONSUMER_GROUP": harness.unique_group("first-scrape")}))
        first_text = t.request("GET", "/metrics").body.decode("utf-8")
        first = parse_exposition(first_text)
        self.assertEqual(promtool_problems(first_text), "", "first scrape")
        t.wait_ready()

        # Load: writers post while the scrapes run; every scrape under load passes promtool.
        stop = threading.Event()
        statuses = []

        def writer(base):
            i = 0
            while not stop.is_set():
                statuses.append(t.apply(event_id="first-scrape", phone=harness.phone_for(base + i)).status)
                i += 1

        writers = [threading.Thread(target=writer, args=(8_000_000 + k * 100_000,)) for k in range(4)]
        for w in writers:
            w.start()
        try:
            for _ in range(5):
                text = t.request("GET", "/metrics").body.decode("utf-8")
                self.assertEqual(promtool_problems(text), "", "scrape under load")
                parse_exposition(text)
                time.sleep(0.3)
        finally:
            stop.set()
            for w in writers:
                w.join()
        self.assertTrue(statuses)
        self.assertEqual(set(statuses), {201})
        harness.wait_until(lambda: self.pg.count("outbox_status WHERE published_at IS NULL") == 0,
                           timeout=60, what="every outbox row published")
        harness.wait_until(lambda: self.pg.count("processed_events") >= len(statuses),
                           timeout=60, what="every event processed")
        busy_text = t.request("GET", "/metrics").body.decode("utf-8")
        self.assertEqual(promtool_problems(busy_text), "", "scrape after the load")
        busy = parse_exposition(busy_text)
        missing = sorted(label_less_samples(busy) - label_less_samples(first))
        self.assertEqual(missing, [], "series without labels absent from the first scrape "
                         "(zero them at describe: label_less[] in src/metrics.c)")
        for name in ("ticketd_outbox_backlog", "ticketd_relay_published_total",
                     "ticketd_consumer_processed_total", "ticketd_relay_active"):
            self.assertIn(name, label_less_samples(first), name)
        self.assertGreater(value(busy, "ticketd_relay_published_total"), 0)

    def test_promtool_can_fail(self):
        self.assertNotEqual(promtool_problems("# TYPE ticketd_x counter\nticketd_x 1\n"), "")


if __name__ == "__main__":
    unittest.main()
