"""Issue 17: `ticketd report --event-id E` and GET /admin/report, the post-event report.

A real opening: applications through a ticketd with every role (api, relay, consumer) against
PostgreSQL, a `ticketd kafka-mock` and a fake data-platform sink, waited until processed.
The report is opened in headless Chromium (a screenshot, and the rendered DOM), and its
numbers are checked against psql and a kcat read of the topic; the SHA-256 of its evidence
section is recomputed from the file, stable across runs on the same data and different once
the data changes. A second opening is made with losses on purpose (a dead letter left in the
DLQ, a deleted outbox row, a deleted processed_events row; another dead letter replayed): the
report says so at the top and lists exactly those applications, phones masked.
"""
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from consumer_case import SHORT_SESSION, ConsumerTestCase  # noqa: E402

TOPIC = "ticket-applied"
PARTS = ConsumerTestCase.PARTITIONS
SHOW = "spring-gala-2026"
OTHER = "other-show"
CHROMIUM = "/usr/bin/chromium"
BEGIN, END = "<!-- evidence:begin -->\n", "\n<!-- evidence:end -->"


class _Dom(html.parser.HTMLParser):
    """The text of every element with a data-key attribute, and the page's text."""

    def __init__(self):
        super().__init__()
        self.keys, self.text, self._open = {}, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._open.append((tag, a.get("data-key"), len(self.text)))

    def handle_endtag(self, tag):
        while self._open:
            t, key, start = self._open.pop()
            if key:
                self.keys[key] = "".join(self.text[start:]).strip()
            if t == tag:
                break

    def handle_data(self, data):
        self.text.append(data)


def evidence_sha(html_text):
    body = html_text.split(BEGIN, 1)[1].split(END, 1)[0]
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class ReportTest(ConsumerTestCase):
    GROUP_PREFIX = "report"
    START_ENV = SHORT_SESSION

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        r = h.run_ticketd(["migrate"], env={"DATABASE_URL": cls.pg.url})
        if r.returncode != 0:
            raise RuntimeError(f"migrate failed: {r.stderr}")

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="ticketd-report-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.env = {"DATABASE_URL": self.pg.url, "KAFKA_BROKERS": self.kafka.brokers,
                    "CONSUMER_GROUP": self.group, "LOG_LEVEL": "warn", "AUDIT_GRACE": "2s"}
        self.td = self.start(env={"AUDIT_GRACE": "2s"})
        self.wait_assigned(self.td)
        self.phones = {}   # application id -> phone as applied

    # ------------------------------------------------------------------ helpers

    def apply(self, i, show=SHOW):
        phone = h.phone_for(5_000 + i)
        r = self.td.apply(event_id=show, phone=phone, name=f"Applicant {i}")
        self.assertEqual(r.status, 201, r)
        app_id = self.pg.application_id(r.json())
        self.phones[app_id] = phone
        return app_id

    def settled(self):
        """Every application processed with its follow-ups done (or dead-lettered), and the
        group's offsets committed past them: the audit sees nothing pending."""
        r = self.td.admin("GET", f"/admin/audit?event_id={SHOW}")
        if r.status != 200:
            return False
        s = r.json()["stages"]
        return (s["kafka_consumer"]["pending"] == 0 and s["outbox_kafka"]["in_grace"] == 0
                and self.pg.count("event_effects WHERE NOT done AND event_id NOT IN"
                                  " (SELECT event_id FROM dead_letters WHERE replayed_at IS NULL)") == 0)

    def report(self, name, expect_rc=0):
        out = os.path.join(self.tmp, name)
        r = h.run_ticketd(["report", "--event-id", SHOW, "--out", out], env=self.env, timeout=180)
        self.assertEqual(r.returncode, expect_rc, f"{r.stdout}\n{r.stderr}")
        with open(out, encoding="utf-8") as f:
            text = f.read()
        m = re.search(r"evidence sha256 ([0-9a-f]{64})", r.stdout)
        self.assertIsNotNone(m, r.stdout)
        # The hash printed, the hash in the document and the hash of its evidence bytes agree.
        self.assertEqual(m.group(1), evidence_sha(text))
        self.assertIn(f'id="evidence-sha256">{m.group(1)}<', text)
        return out, text, m.group(1)

    def render(self, path):
        """Headless Chromium: a screenshot (PNG) and the rendered DOM of the report."""
        profile = tempfile.mkdtemp(prefix="chromium-", dir=self.tmp)
        base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars"]
        png = path + ".png"
        r = subprocess.run(base + [f"--screenshot={png}", "--window-size=1100,1500",
                                   "file://" + path], capture_output=True, timeout=180)
        self.assertTrue(os.path.exists(png), r.stderr.decode(errors="replace")[-2000:])
        with open(png, "rb") as f:
            data = f.read()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(data), 20_000, "screenshot looks empty")
        r = subprocess.run(base + ["--dump-dom", "file://" + path], capture_output=True,
                           timeout=180)
        dom_text = r.stdout.decode("utf-8")
        self.assertIn('id="verdict-sentence"', dom_text, r.stderr.decode(errors="replace")[-2000:])
        dom = _Dom()
        dom.feed(dom_text)
        return dom, dom_text, png

    def num(self, dom, key):
        self.assertIn(key, dom.keys, sorted(dom.keys))
        return int(dom.keys[key])

    def check_against_sources(self, dom, n_apps, orphans=()):
        """Every number of the evidence that psql or kcat can tell, told by them."""
        pg = self.pg
        show = f"payload->>'event_id' = '{SHOW}'"
        self.assertEqual(self.num(dom, "applications"), n_apps)
        self.assertEqual(self.num(dom, "applications"),
                         pg.count(f"applications WHERE event_id = '{SHOW}'"))
        self.assertEqual(self.num(dom, "outbox_rows"), pg.count(f"outbox WHERE {show}"))
        self.assertEqual(self.num(dom, "published"),
                         pg.count(f"outbox_status WHERE {show} AND published_at IS NOT NULL"))
        self.assertEqual(self.num(dom, "processed_events"), pg.count(
            f"processed_events pe JOIN outbox o USING (event_id) WHERE o.{show}"))
        for effect in ("points", "data_platform", "email"):
            base = f"event_effects e JOIN outbox o USING (event_id) WHERE o.{show} AND e.effect = '{effect}'"
            self.assertEqual(self.num(dom, f"{effect}_rows"), pg.count(base), effect)
            self.assertEqual(self.num(dom, f"{effect}_delivered"), pg.count(base + " AND e.done"), effect)
        self.assertEqual(dom.keys["duplicates"], "not recorded")
        # The topic, read by kcat: this show's messages per partition and their offsets;
        # copies at a position no row records (a replay re-sends) and messages whose outbox
        # row is gone (keys in `orphans`) in columns of their own.
        recorded = {(int(p), int(o)) for p, o in pg.query(
            f"SELECT kafka_partition, kafka_offset FROM outbox_status WHERE {show} AND published_at IS NOT NULL")}
        per, copies, lone = {}, {}, {}
        for m in h.kcat_consume(self.kafka.brokers, TOPIC):
            if json.loads(m["value"]).get("event_id") != SHOW:
                continue
            into = (lone if int(m["key"]) in orphans
                    else per if (m["partition"], m["offset"]) in recorded else copies)
            into.setdefault(m["partition"], []).append(m["offset"])
        in_topic = 0
        for p in range(PARTS):
            offs = per.get(p, [])
            in_topic += len(offs)
            self.assertEqual(self.num(dom, f"p{p}_messages"), len(offs), f"partition {p}")
            self.assertEqual(self.num(dom, f"p{p}_verified"), len(offs), f"partition {p}")
            self.assertEqual(self.num(dom, f"p{p}_copies"), len(copies.get(p, [])), f"partition {p}")
            self.assertEqual(self.num(dom, f"p{p}_orphans"), len(lone.get(p, [])), f"partition {p}")
            self.assertEqual(dom.keys[f"p{p}_range"],
                             f"{min(offs)}..{max(offs)}" if offs else "-", f"partition {p}")
        self._copies = sum(len(v) for v in copies.values())
        return in_topic

    def check_no_phone(self, text):
        for phone in self.phones.values():
            digits = phone.replace("-", "")
            self.assertNotIn(digits, text)
            self.assertNotIn(phone, text)

    # ------------------------------------------------------------------ tests

    def test_clean_opening(self):
        n = 30
        ids = [self.apply(i) for i in range(n)]
        self.apply(900, show=OTHER)                        # another show: not counted
        dup = self.td.apply(event_id=SHOW, phone=self.phones[ids[0]], name="Again")
        self.assertEqual(dup.status, 409, dup)              # refused, writes nothing
        bad = self.td.request("POST", "/v1/applications", json={"event_id": SHOW})
        self.assertIn(bad.status, (400, 422), bad)
        h.wait_until(self.settled, timeout=90, interval=0.5, what="the opening settled")

        path, text, sha = self.report("clean.html", expect_rc=0)
        dom, dom_text, _ = self.render(path)
        self.assertRegex(dom_text, r'id="verdict-sentence">Not one application was lost: all 30 ')
        self.assertEqual(dom.keys["verdict"], "complete")
        self.assertEqual(self.num(dom, "missing"), 0)
        in_topic = self.check_against_sources(dom, n)
        self.assertEqual(in_topic, n)
        self.assertEqual(self.num(dom, "verified"), n)
        self.assertEqual(self.num(dom, "processed_done"), n)
        self.assertEqual(self.num(dom, "points_delivered"), n)
        self.assertEqual(self.num(dom, "data_platform_delivered"), n)
        self.assertEqual(self.num(dom, "dead_letters"), 0)
        self.assertEqual(self.num(dom, "missing_listed"), 0)
        # The timeline: an inline SVG whose series add up to the counts.
        self.assertIn("<svg", text)
        self.assertRegex(text, rf'data-series="accepted" data-sum="{n}"')
        self.assertRegex(text, rf'data-series="published" data-sum="{n}"')
        self.assertRegex(text, rf'data-series="processed" data-sum="{n}"')
        # Self-contained: no external asset of any kind.
        self.assertNotRegex(text, r'(src|href)\s*=|@import|url\(')
        # Made when, by what, from where (the password redacted).
        self.assertIn("ticketd ", dom.keys["version"])
        self.assertIn("ticketd", dom.keys["database"])
        self.assertIn(self.kafka.brokers, dom.keys["cluster"])
        self.check_no_phone(text)

        # The same data: the same evidence hash, from the CLI and from the admin route.
        _, text2, sha2 = self.report("clean-again.html")
        self.assertEqual(sha2, sha)
        self.assertNotEqual(text2, text)  # the time it was made differs, outside the evidence
        r = self.td.admin("GET", f"/admin/report?event_id={SHOW}")
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.headers.get("content-type", "").startswith("text/html"), r.headers)
        self.assertEqual(evidence_sha(r.body.decode("utf-8")), sha)

        # Another show's application moves the topic and the group's offsets, not this
        # show's evidence.
        self.apply(901, show=OTHER)
        h.wait_until(lambda: self.pg.count("processed_events") == n + 2, timeout=90,
                     what="the other show's application processed")
        _, _, sha_other = self.report("clean-other-show.html")
        self.assertEqual(sha_other, sha)

        # The data changes (one more application): so does the hash.
        self.apply(n)
        h.wait_until(self.settled, timeout=90, interval=0.5, what="the new application settled")
        _, text3, sha3 = self.report("clean-changed.html")
        self.assertNotEqual(sha3, sha)
        self.assertIn(f'data-key="applications">{n + 1}<', text3)

    def test_opening_with_losses(self):
        n = 16
        ids = [self.apply(i) for i in range(n)]
        h.wait_until(self.settled, timeout=90, interval=0.5, what="the first applications settled")
        # Two applications the data platform refuses until they are dead-lettered.
        digits = {i: h.phone_for(5_000 + i).replace("-", "") for i in (100, 101)}
        self.sink.fail_matching(digits[100])
        dl_open = self.apply(100)
        h.wait_until(lambda: self.pg.count(f"dead_letters WHERE application_id = {dl_open}") == 1,
                     timeout=60, what="first dead letter")
        self.sink.fail_matching(digits[101])
        dl_replayed = self.apply(101)
        h.wait_until(lambda: self.pg.count(f"dead_letters WHERE application_id = {dl_replayed}") == 1,
                     timeout=60, what="second dead letter")
        ce_replayed = self.pg.scalar(f"SELECT event_id FROM dead_letters WHERE application_id = {dl_replayed}")
        self.sink.fail_matching(digits[100])  # the other one still fails
        r = self.td.admin("POST", "/admin/dlq/replay", json={"event_id": ce_replayed})
        self.assertEqual(r.status, 200, r)
        h.wait_until(lambda: self.pg.count(f"event_effects WHERE application_id = {dl_replayed}"
                                           " AND NOT done") == 0, timeout=60, what="replay delivered")
        h.wait_until(self.settled, timeout=90, interval=0.5, what="the opening settled")
        # Losses made on purpose, as test_audit.py does: an outbox row and a processed
        # record vanish (the ticketd's own tables, behind its back).
        no_outbox, unhandled = ids[3], ids[7]
        self.pg.execute(f"DELETE FROM outbox WHERE aggregate_id = {no_outbox}")
        ce = self.pg.scalar(f"SELECT event_id FROM outbox WHERE aggregate_id = {unhandled}")
        self.pg.execute(f"DELETE FROM event_effects WHERE event_id = '{ce}';"
                        f" DELETE FROM processed_events WHERE event_id = '{ce}'")

        path, text, sha = self.report("losses.html", expect_rc=1)
        dom, dom_text, png = self.render(path)
        if os.environ.get("REPORT_KEEP"):   # a directory: keep the report and its screenshot
            shutil.copy(path, os.environ["REPORT_KEEP"])
            shutil.copy(png, os.environ["REPORT_KEEP"])
        self.assertEqual(dom.keys["verdict"], "incomplete")
        self.assertRegex(dom_text, r'id="verdict-sentence">LOSSES: 3 of the 18 applications')
        self.assertIn('<section id="verdict" class="loss">', text)
        self.assertEqual(self.num(dom, "missing"), 3)
        self.check_against_sources(dom, n + 2, orphans={no_outbox})
        self.assertEqual(self._copies, 1)   # the replay re-sent its event once
        # Every loss listed by application id, masked phone, never the full number.
        listed = [int(x) for x in re.findall(r'<tr data-application="(\d+)">', dom_text)]
        self.assertEqual(listed, sorted([no_outbox, unhandled, dl_open]))
        for app_id in listed:
            phone = self.phones[app_id]
            row = re.search(rf'<tr data-application="{app_id}">(.*?)</tr>', dom_text, re.S).group(1)
            self.assertIn(f"010-****-{phone[-4:]}", row)
        self.assertIn("has no outbox row", dom_text)
        self.assertIn("neither processed nor dead-lettered", dom_text)
        self.check_no_phone(text)
        # The dead letters, each with its class, attempts, replay and outcome (psql agrees).
        self.assertEqual(self.num(dom, "dead_letters"), self.pg.count("dead_letters"))
        self.assertEqual(self.num(dom, "dead_letters"), 2)
        rows = re.findall(r'<tr class="(open|replayed)">(.*?)</tr>', dom_text, re.S)
        self.assertEqual(sorted(c for c, _ in rows), ["open", "replayed"])
        for cls, row in rows:
            self.assertIn("sink_status", row)
            self.assertIn("<td>3</td>", row)   # RETRY_MAX_ATTEMPTS
            self.assertIn("delivered after the replay" if cls == "replayed"
                          else "open: in the DLQ, not replayed", row)
        self.assertEqual(self.num(dom, "data_platform_replayed"), 1)
        self.assertEqual(self.num(dom, "data_platform_dead_lettered"), 1)
        # Unchanged data, unchanged hash; the losses repaired on paper change it.
        _, _, sha2 = self.report("losses-again.html", expect_rc=1)
        self.assertEqual(sha2, sha)

    def test_data_is_escaped_and_bad_input_refused(self):
        app_id = self.apply(1)
        h.wait_until(self.settled, timeout=90, interval=0.5, what="the opening settled")
        ce = self.pg.scalar(f"SELECT event_id FROM outbox WHERE aggregate_id = {app_id}")
        # A dead letter whose texts (they come from sinks and brokers) carry markup.
        self.pg.execute(
            "INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition,"
            " src_offset, dlq_partition, dlq_offset, attempts, error_class, error_message)"
            f" VALUES ('{ce}', {app_id}, '{TOPIC}', 0, 0, 0, 0, 3, '<b>cls</b>',"
            " '<script>alert(1)</script> & \"quoted\"')")
        # (the event itself was processed: the audit finds nothing missing)
        _, text, _ = self.report("escaped.html", expect_rc=0)
        self.assertIn("not replayed; the event was processed all the same", text)
        self.assertNotIn("<script>", text)
        self.assertNotIn("<b>cls</b>", text)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot;", text)
        self.assertIn("&lt;b&gt;cls&lt;/b&gt;", text)
        self.check_no_phone(text)

        # Bad input: a clear error, exit 2, nothing written.
        out = os.path.join(self.tmp, "bad.html")
        for args in (["--event-id", "no spaces<allowed>"], []):
            r = h.run_ticketd(["report", "--out", out] + args, env=self.env, timeout=60)
            self.assertEqual(r.returncode, 2, r)
            self.assertFalse(os.path.exists(out))
        self.assertIn("event id", h.run_ticketd(["report", "--event-id", "a b"], env=self.env,
                                                timeout=60).stderr)
        self.assertEqual(self.td.admin("GET", "/admin/report").status, 400)
        self.assertEqual(self.td.admin("GET", "/admin/report?event_id=a%20b").status, 400)
        self.assertEqual(self.td.admin("GET", f"/admin/report?event_id={SHOW}", token=None).status,
                         401)


if __name__ == "__main__":
    unittest.main()
