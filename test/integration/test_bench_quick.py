"""bench/rush --quick keeps working: a small staged opening end to end (throwaway PostgreSQL,
kafka-mock, sink, ticketd, loadgen), then its correctness checks. Asserts correctness only
(audit 0 missing, one DB row per distinct 201 id, every stage drained), never timing."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

RUSH = os.path.join(harness.SOURCE_DIR, "bench", "rush")
LOADGEN = os.path.join(os.path.dirname(harness.BIN), "bench", "loadgen")


class BenchQuickTest(unittest.TestCase):
    def test_quick_rush_is_correct(self):
        if not os.access(LOADGEN, os.X_OK):
            self.fail(f"{LOADGEN} is not built (it is part of the default build)")
        out = tempfile.mkdtemp(prefix="ticketd-rush-test-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", out]))
        env = dict(os.environ, TICKETD_BIN=harness.BIN, LOADGEN_BIN=LOADGEN)
        proc = subprocess.Popen([sys.executable, RUSH, "--quick", "--out", out], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            stdout, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the bench stop what it started (PostgreSQL is not its child).
            proc.send_signal(signal.SIGTERM)
            try:
                stdout, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            self.fail(f"bench/rush --quick did not finish in 300 s:\n{stdout[-4000:]}")
        self.assertEqual(proc.returncode, 0, f"bench/rush --quick failed:\n{stdout[-6000:]}")

        with open(os.path.join(out, "rush.json")) as f:
            doc = json.load(f)
        self.assertTrue(doc["ok"], doc.get("failed_runs"))
        self.assertEqual(len(doc["runs"]), 1)
        run = doc["runs"][0]
        self.assertEqual(run["problems"], [])

        totals = run["loadgen"]["totals"]
        ids = run["ids"]
        # the mix was exercised: new applications, duplicate re-submits and invalid bodies
        self.assertGreater(totals["201"], 1000)
        self.assertGreater(totals["409"], 0)
        self.assertGreater(totals["400"], 0)
        # exactly one application row and one outbox row per distinct id answered 201
        self.assertEqual(ids["answers_201"], totals["201"])
        self.assertGreater(ids["distinct_201_ids"], 1000)
        self.assertEqual(ids["db_rows"], ids["distinct_201_ids"])
        self.assertEqual(ids["ids_without_row"], 0)
        self.assertEqual(ids["outbox_rows"], ids["db_rows"])
        with open(os.path.join(out, "quick", "ids.txt")) as f:
            self.assertEqual(len(set(f.read().split())), ids["distinct_201_ids"])

        # the audit's verdict: nothing missing, and it counted this event's applications
        self.assertEqual(run["audit"]["rc"], 0, run["audit"])
        self.assertIn(" 0 missing", run["audit"]["verdict"])
        self.assertIn(f"{ids['db_rows']} applications", run["audit"]["verdict"])
        self.assertIn("audit: " + run["audit"]["verdict"], stdout)

        # every committed row was published and processed (effects done, nothing dead-lettered)
        db = run["db"]
        self.assertEqual(db["unpublished_at_end"], 0)
        self.assertEqual(db["dead_letters"], 0)
        self.assertEqual(db["effects_not_done"], 0)
        self.assertEqual(db["commit_to_ack"]["count"], ids["db_rows"])
        self.assertEqual(db["publish_to_processed"]["count"], ids["db_rows"])
        self.assertGreaterEqual(run["sink_posts"], ids["db_rows"])  # data platform got each
        self.assertIsNotNone(run["t_drained"])
        self.assertTrue(any(s.get("backlog") == 0 and s.get("lag") == 0 for s in run["samples"]))

        # the chart is well-formed SVG with its three panels' data
        root = ET.parse(run["chart"]).getroot()
        self.assertTrue(root.tag.endswith("svg"))
        self.assertGreaterEqual(len(root.findall("{http://www.w3.org/2000/svg}polyline")), 4)


if __name__ == "__main__":
    unittest.main()
