"""Reads cannot starve group commit (issue 11 item 4).

A flood of application lookups (wrk, 256 connections, any client can send them) runs while
200 applications are POSTed: every POST must be answered 201 and be in PostgreSQL. This is a
count within generous deadlines, not a speed assertion. On the old pool a freed connection
went to the next queued query, so with 256 lookups always queued no batch ever found an idle
connection and the POSTs got no answer at all.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

POSTS = 200


class ReadFloodTest(h.TicketdTestCase):

    def setUp(self):
        self.reset_db()

    def lookup_target(self, td):
        """The (event_id, phone) lookup: an admin route after issue 12, public before."""
        q = "?event_id=concert-2026&phone=010-0000-0001"
        r = td.admin("GET", "/admin/applications" + q)
        if r.status == 200:
            return "/admin/applications" + q, {"Authorization": f"Bearer {h.ADMIN_TOKEN}"}
        r = td.request("GET", "/v1/applications" + q)
        self.assertEqual(r.status, 200, r)
        return "/v1/applications" + q, {}

    @unittest.skipUnless(shutil.which("wrk"), "wrk is not installed")
    def test_posts_answered_during_a_lookup_flood(self):
        td = self.track(h.Ticketd(self.pg, role="api", env={"DB_POOL": "4"}))
        for i in range(20):  # something to find
            self.assertEqual(td.apply(phone=h.phone_for(i)).status, 201)
        path, headers = self.lookup_target(td)

        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        self.addCleanup(os.unlink, script.name)
        script.write("wrk.method = 'GET'\n")
        for k, v in headers.items():
            script.write(f"wrk.headers['{k}'] = '{v}'\n")
        script.close()
        flood = subprocess.Popen(["wrk", "-t2", "-c256", "-d300s", "-s", script.name,
                                  td.url + path], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        self.addCleanup(lambda: flood.poll() is None and flood.kill())
        # the flood is on: lookups are being answered (200, or 503 once reads are bounded)
        def answered():
            return sum(v for k, v in td.metrics().items()
                       if k.startswith("ticketd_http_requests_total{"))
        h.wait_until(lambda: answered() > 500, timeout=60,
                     what="the lookup flood reached the service")

        deadline = time.time() + 120  # generous: the fixed pool needs a few seconds

        def post(i):
            if time.time() > deadline:
                return "not sent: deadline passed"
            try:
                return td.apply(phone=h.phone_for(1000 + i), timeout=20).status
            except OSError as e:
                return f"no answer: {e}"

        statuses = h.parallel(post, range(POSTS), workers=16)
        refused = sum(v for k, v in td.metrics().items()
                      if k.startswith("ticketd_http_requests_total{") and 'code="503"' in k)
        still_flooding = flood.poll() is None
        flood.kill()
        flood.wait()
        bad = [s for s in statuses if s != 201]
        self.assertEqual(bad, [], f"every POST answered 201 while reads were queued"
                         f" ({len(bad)} of {POSTS} not)")
        self.assertTrue(still_flooding, "the flood ran during every POST")
        self.assertGreater(refused, 0, "reads beyond the bound got a quick 503")
        # the flood is over: once the reads it left queued are done, reads are served again
        h.wait_until(lambda: td.request("GET", path, headers=headers).status == 200,
                     timeout=30, what="a lookup answered 200 after the flood")
        self.assertEqual(self.pg.count("applications WHERE phone LIKE '0100000%'"
                                       " AND phone >= '01000001000'"), POSTS)


if __name__ == "__main__":
    unittest.main(verbosity=2)
