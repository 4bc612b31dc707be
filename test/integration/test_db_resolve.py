"""Host-name resolution never blocks the loop (issue 11 item 3).

libpq's PQconnectStartParams resolves a host name with a blocking getaddrinfo(). An
LD_PRELOAD shim (slow_getaddrinfo.c, built here) makes the lookup of one name take 4 s; the
database is reached by that name. After start-up the test makes the name slow and kills the
pool's sessions, so every connection reconnects: /healthz must keep answering promptly
meanwhile (on the old pool each reconnect froze the loop for the whole lookup), and the pool
must come back (a POST is stored).
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

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "slowdb.ticketd.test"
DELAY_MS = 4000


class ResolveTest(h.TicketdTestCase):

    @classmethod
    def setUpClass(cls):
        cls.pg = h.Pg(extra_conf={"listen_addresses": "127.0.0.1"})

    @unittest.skipUnless(shutil.which("cc"), "no C compiler")
    def test_slow_lookup_does_not_freeze_the_loop(self):
        tmp = tempfile.mkdtemp(prefix="ticketd-gai-")
        self.addCleanup(shutil.rmtree, tmp, True)
        shim = os.path.join(tmp, "slow_getaddrinfo.so")
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", shim,
                        os.path.join(HERE, "slow_getaddrinfo.c"), "-ldl"], check=True)
        delay_file = os.path.join(tmp, "delay_ms")
        with open(delay_file, "w") as f:
            f.write("0")
        url = f"host={NAME} port={self.pg.port} user=postgres dbname=ticketd"
        # an ASan build wants its runtime first among the preloaded libraries
        ldd = subprocess.run(["ldd", h.BIN], capture_output=True, text=True).stdout
        asan = [w for line in ldd.splitlines() if "libasan" in line
                for w in line.split() if w.startswith("/")]
        td = self.track(h.Ticketd(self.pg, role="api", env={
            "DATABASE_URL": url, "LD_PRELOAD": " ".join(asan[:1] + [shim]),
            "SLOW_GAI_NAME": NAME,
            "SLOW_GAI_FILE": delay_file, "DB_POOL": "4"}))
        self.assertEqual(td.apply(phone=h.phone_for(1)).status, 201)

        with open(delay_file, "w") as f:
            f.write(str(DELAY_MS))
        killed = self.pg.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                " WHERE application_name LIKE 'ticketd-%'")
        self.assertGreaterEqual(int(killed), 4)
        worst, t_end = 0.0, time.time() + 3 * DELAY_MS / 1000
        while time.time() < t_end:
            t0 = time.monotonic()
            r = td.request("GET", "/healthz", timeout=30)
            worst = max(worst, time.monotonic() - t0)
            self.assertEqual(r.status, 200)
            time.sleep(0.05)
        self.assertLess(worst, DELAY_MS / 1000 / 2,
                        f"/healthz waited {worst:.1f} s while the pool reconnected")
        # the pool reconnects through the slow lookups: a POST is stored again
        h.wait_until(lambda: td.apply(phone=h.phone_for(2), timeout=30).status == 201,
                     timeout=60, what="a POST after the reconnect")
        self.assertEqual(self.pg.count("applications"), 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
