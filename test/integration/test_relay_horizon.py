"""The relay's cursor (issue 14): outbox rows are read in (xid, id) order below the
transaction horizon, from a cursor kept in the lease row, so a row whose transaction
commits after a later id's is still published, and a new leader continues where the old
one stopped.

Transactions are held open with a psql session of our own (stdin pipe), so the order of
commits is the test's, not the scheduler's. Messages are read back with kcat."""
import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KafkaMock, Ticketd, TicketdTestCase, kcat_consume,  # noqa: E402
                     wait_until)

TOPIC = "ticket-applied"
ENV = {"ROLE": "relay", "RELAY_INTERVAL": "100ms", "LOG_LEVEL": "info"}


class Session:
    """One psql session: statements are sent and their completion awaited (\\echo marks)."""

    def __init__(self, pg):
        self.p = subprocess.Popen(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", pg.dir, "-p",
             str(pg.port), "-U", "postgres", "-d", "ticketd"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.n = 0

    def run(self, sql):
        """Runs sql; returns its output lines."""
        self.n += 1
        mark = f"--done {self.n}--"
        self.p.stdin.write(f"{sql}\n\\echo {mark}\n")
        self.p.stdin.flush()
        out = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise AssertionError(f"psql ended: {''.join(out)}")
            if line.strip() == mark:
                return out
            out.append(line.strip())

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=30)


def insert_sql(tag):
    return ("INSERT INTO outbox (aggregate_id, event_type, payload) VALUES"
            f" (0, 'TicketApplied', jsonb_build_object('tag', '{tag}'))"
            " RETURNING id, event_id;")


class RelayHorizonTest(TicketdTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from harness import run_ticketd
        r = run_ticketd(["migrate"], env={"DATABASE_URL": cls.pg.url})
        if r.returncode != 0:
            raise RuntimeError(f"migrate failed: {r.stderr}")

    def setUp(self):
        self.reset_db()
        self.kafka = self.track(KafkaMock(partitions=3))

    def start(self, name="relay"):
        return self.track(Ticketd(self.pg, brokers=self.kafka.brokers, env=ENV, name=name))

    def session(self):
        s = Session(self.pg)
        self.addCleanup(s.close)
        return s

    def insert(self, s, tag):
        row = s.run(insert_sql(tag))[0].split("|")
        return int(row[0]), row[1]

    def published(self, ce_ids):
        got = {r[0] for r in self.pg.query(
            "SELECT event_id::text FROM outbox_status WHERE published_at IS NOT NULL")}
        return set(ce_ids) <= got

    def topic_ce_ids(self, expect):
        msgs = kcat_consume(self.kafka.brokers, TOPIC, expect=expect, timeout=60)
        return [m["headers"].get("ce_id") for m in msgs]

    def test_lower_id_committed_last_is_published(self):
        relay = self.start()
        # A warm-up row: the relay is claiming before the race below.
        w = self.session()
        _, warm = self.insert(w, "warm-up")
        wait_until(lambda: self.published([warm]), timeout=60, what="the warm-up row published")

        low, high = self.session(), self.session()
        low.run("BEGIN;")
        low_id, low_ce = self.insert(low, "low")      # takes the lower id, stays open
        high_id, high_ce = self.insert(high, "high")  # autocommit: committed first
        self.assertLess(low_id, high_id)
        # Give a relay that reads past uncommitted ids every chance to step over low_id
        # (a fixed wait only to let a broken relay show itself; nothing is timed).
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not self.published([high_ce]):
            time.sleep(0.1)
        time.sleep(1)
        low.run("COMMIT;")
        wait_until(lambda: self.published([low_ce, high_ce]), timeout=60,
                   what="both rows published (the lower id committed last)")
        ce_ids = self.topic_ce_ids(expect=3)
        for ce in (warm, low_ce, high_ce):
            self.assertIn(ce, ce_ids, "a row is missing from the topic")
        # The durable cursor has passed both.
        wait_until(lambda: int(self.pg.scalar(
            "SELECT cursor_id FROM relay_lease WHERE name = 'relay'")) >= high_id, timeout=30,
                   what="the durable cursor past both rows")
        self.assertTrue(relay.alive())

    def test_rolled_back_id_leaves_no_hole(self):
        self.start()
        a, b = self.session(), self.session()
        a.run("BEGIN;")
        self.insert(a, "rolled-back")
        _, kept = self.insert(b, "kept")
        a.run("ROLLBACK;")
        _, after = self.insert(b, "after")
        wait_until(lambda: self.published([kept, after]), timeout=60,
                   what="the rows around a rolled-back id published")
        self.assertEqual(self.pg.count("outbox"), 2)

    def test_new_leader_continues_from_the_durable_cursor(self):
        first = self.start(name="relay-a")
        s = self.session()
        ces = [self.insert(s, f"a{i}")[1] for i in range(20)]
        wait_until(lambda: self.published(ces), timeout=60, what="the first rows published")
        self.assertEqual(first.terminate(timeout=60), 0)
        cursor = int(self.pg.scalar("SELECT cursor_id FROM relay_lease WHERE name = 'relay'"))
        top = int(self.pg.scalar("SELECT max(id) FROM outbox"))
        self.assertEqual(cursor, top, "a graceful stop stores the cursor past every row")
        self.start(name="relay-b")
        more = [self.insert(s, f"b{i}")[1] for i in range(10)]
        wait_until(lambda: self.published(more), timeout=60, what="the later rows published")
        ce_ids = self.topic_ce_ids(expect=30)
        self.assertEqual(sorted(ce_ids), sorted(ces + more),
                         "the new leader re-sent rows below the durable cursor, or lost one")

    def test_a_row_that_keeps_failing_does_not_resend_the_rows_after_it(self):
        """Each retry of a failing row rewinds the cursor below it; the rows published since
        already have records and are not produced again."""
        self.start_env = dict(ENV, RELAY_RETRY_BACKOFF="100ms",
                              KAFKA_CONFIG="message.max.bytes=2000")
        self.track(Ticketd(self.pg, brokers=self.kafka.brokers, env=self.start_env,
                           name="relay"))
        s = self.session()
        s.run("INSERT INTO outbox (aggregate_id, event_type, payload) VALUES (0, 'TicketApplied',"
              " jsonb_build_object('tag', repeat('x', 5000)));")
        ces = [self.insert(s, f"after{i}")[1] for i in range(10)]
        wait_until(lambda: self.published(ces), timeout=60, what="the rows after it published")
        wait_until(lambda: int(self.pg.scalar("SELECT max(attempts) FROM outbox")) >= 4,
                   timeout=60, what="the oversized row retried a few times")
        self.assertEqual(sorted(self.topic_ce_ids(expect=10)), sorted(ces))
        wait_until(lambda: int(self.pg.scalar("SELECT max(attempts) FROM outbox")) >= 6,
                   timeout=60, what="more retries")
        self.assertEqual(sorted(self.topic_ce_ids(expect=10)), sorted(ces),
                         "a retry re-sent rows that were published already")


if __name__ == "__main__":
    unittest.main()
