"""ticketd behind PgBouncer (Debian's), the pooler many Kubernetes deployments put in front of
PostgreSQL (issue 16).

- Session pooling works: `ticketd serve` (API, relay and consumer) whose DATABASE_URL is
  PgBouncer's loopback port (PostgreSQL itself listens on a unix socket only, so there is no
  other way in) takes applications, publishes them (kcat reads them back) and handles them
  (processed once, points once); `ticketd migrate` and `ticketd audit` work through it too,
  and PgBouncer's own statistics show the traffic.
- Transaction pooling is refused at start: ticketd exits 1 before listening, and says why
  (shared server sessions: LISTEN, the session-level relay lock, prepared statements) and
  what to do (pool_mode = session). src/pooler_check.c.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TOPIC = "ticket-applied"
PARTITIONS = 3


class PgBouncer(harness._Proc):
    """PgBouncer on 127.0.0.1:<free port> in front of pg's database ticketd (trust auth),
    run as the postgres user (it refuses root)."""

    def __init__(self, pg, pool_mode):
        self.port = harness.free_port()
        self.confdir = tempfile.mkdtemp(prefix="ticketd-pgbouncer-")
        os.chmod(self.confdir, 0o755)
        ini = os.path.join(self.confdir, "pgbouncer.ini")
        users = os.path.join(self.confdir, "userlist.txt")
        with open(users, "w") as f:
            f.write('"postgres" ""\n')
        with open(ini, "w") as f:
            f.write(f"""[databases]
ticketd = host={pg.dir} port={pg.port} dbname=ticketd user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
admin_users = postgres
pool_mode = {pool_mode}
max_client_conn = 200
default_pool_size = 40
ignore_startup_parameters = extra_float_digits
""")
        argv = ["pgbouncer", ini]
        if harness.IS_ROOT:
            argv = ["pgbouncer", "-u", "postgres", ini]
        super().__init__(argv, dict(os.environ), "pgbouncer")
        self.url = f"host=127.0.0.1 port={self.port} user=postgres dbname=ticketd"
        harness.wait_until(self._answers, timeout=30, what="pgbouncer answers")

    def _answers(self):
        if not self.alive():
            raise AssertionError(f"pgbouncer exited:\n{self.log_text()}")
        return self.admin("SHOW VERSION") is not None

    def admin(self, command):
        """Rows of a PgBouncer console command (SHOW STATS ...) as dicts, None on failure."""
        r = subprocess.run(["psql", "-X", "-A", "-F", "\x1f", "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", "postgres", "-d", "pgbouncer", "-c", command],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return None
        lines = [line for line in r.stdout.splitlines() if "\x1f" in line or line and not line.startswith("(")]
        head = lines[0].split("\x1f")
        return [dict(zip(head, line.split("\x1f"))) for line in lines[1:] if not line.startswith("(")]

    def close(self):
        super().close()
        shutil.rmtree(self.confdir, ignore_errors=True)


@unittest.skipUnless(shutil.which("pgbouncer"), "pgbouncer not installed (Debian package pgbouncer)")
class BehindPgBouncer(harness.TicketdTestCase):

    def test_session_pooling_applies_relays_and_consumes(self):
        self.reset_db()
        bouncer = self.track(PgBouncer(self.pg, "session"))
        r = harness.run_ticketd(["migrate"], env={"DATABASE_URL": bouncer.url})
        self.assertEqual(r.returncode, 0, r.stderr)
        kafka = self.track(harness.KafkaMock(PARTITIONS))
        group = harness.unique_group("pgbouncer")
        t = self.track(harness.Ticketd(None, kafka.brokers, env={
            "DATABASE_URL": bouncer.url, "CONSUMER_GROUP": group,
            "KAFKA_PARTITIONS": str(PARTITIONS)}))
        self.assertIn("event=sessions_private", t.log_text())
        n = 40
        answers = harness.parallel(lambda i: t.apply(event_id="bouncer", phone=harness.phone_for(i)),
                                   range(n), workers=8)
        self.assertEqual([a.status for a in answers], [201] * n)
        self.assertEqual(t.apply(event_id="bouncer", phone=harness.phone_for(0)).status, 409)
        ids = {self.pg.application_id(a.json()) for a in answers}
        self.assertEqual(len(ids), n)
        id_list = ",".join(map(str, ids))
        self.assertEqual(self.pg.count(f"applications WHERE id IN ({id_list})"), n)
        harness.wait_until(lambda: self.pg.count("outbox_status WHERE published_at IS NULL") == 0,
                           timeout=60, what="every outbox row published through pgbouncer")
        msgs = harness.kcat_consume(kafka.brokers, TOPIC, expect=n, timeout=60)
        self.assertEqual({int(m["key"]) for m in msgs}, ids)
        harness.wait_until(lambda: self.pg.count("processed_events") == n, timeout=90,
                           what="every event processed through pgbouncer")
        harness.wait_until(lambda: self.pg.count("event_effects WHERE NOT done") == 0, timeout=60,
                           what="every effect done")
        self.assertEqual(self.pg.count(f"points_ledger WHERE application_id IN ({id_list})"), n)
        # The traffic went through PgBouncer (its counters), and the audit agrees through it.
        stats = {row["database"]: row for row in bouncer.admin("SHOW STATS")}
        self.assertGreater(int(stats["ticketd"]["total_xact_count"]), n)
        audit = harness.run_ticketd(["audit"], env={
            "DATABASE_URL": bouncer.url, "KAFKA_BROKERS": kafka.brokers,
            "CONSUMER_GROUP": group, "AUDIT_GRACE": "0s"})
        self.assertEqual(audit.returncode, 0, audit.stdout + audit.stderr)
        self.assertEqual(audit.stdout.strip().splitlines()[-1], f"complete: {n} applications, 0 missing")

    def test_transaction_pooling_is_refused_at_start_with_the_reason(self):
        self.reset_db()
        bouncer = self.track(PgBouncer(self.pg, "transaction"))
        port = harness.free_port()
        env = dict(os.environ, DATABASE_URL=bouncer.url, KAFKA_BROKERS="",
                   LISTEN=f"127.0.0.1:{port}", ADMIN_TOKEN=harness.ADMIN_TOKEN)
        r = subprocess.run([harness.BIN, "serve"], env=env, capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        for why in ("transaction", "LISTEN", "lock", "PREPARE", "pool_mode = session"):
            self.assertIn(why, r.stderr)
        self.assertIn("event=pooler_refused", r.stderr + r.stdout)
        self.assertNotIn("event=listening", r.stderr + r.stdout, "refused before listening")
        self.assertEqual(self.pg.count("applications"), 0)

    def test_direct_postgresql_passes_the_check(self):
        t = self.track(harness.Ticketd(self.pg, role="api"))
        self.assertIn("event=sessions_private", t.log_text())
        self.assertEqual(t.apply(event_id="direct", phone=harness.phone_for(99)).status, 201)


if __name__ == "__main__":
    unittest.main()
