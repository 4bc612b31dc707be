"""Migration 6 (issue 14) upgrades a database filled by schema 5 in place.

The database is built with `ticketd migrate to 5` and filled the way the old code did:
applications and outbox rows as ingest commits them, messages produced (kcat) and rows
marked with the old relay's UPDATE (published_at, kafka_partition, kafka_offset); some rows
left unpublished. After `ticketd migrate`: the marks are publication records at the same
positions, the relay's durable cursor starts below the first unpublished row, the partial
indexes are gone; a ticketd (relay + consumer) then publishes the rest and processes
everything, and `ticketd audit` says complete."""
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KafkaMock, Ticketd, TicketdTestCase, kcat_consume, kcat_produce,  # noqa: E402
                     phone_for, run_ticketd, unique_group, wait_until)

TOPIC = "ticket-applied"
SHOW = "upgrade-show"
PARTS = 3


class MigrateUpgradeTest(TicketdTestCase):

    def migrate(self, *args):
        r = run_ticketd(["migrate"] + list(args), env={"DATABASE_URL": self.pg.url})
        self.assertEqual(r.returncode, 0, r.stderr)

    def new_application(self, i):
        """An application and its outbox row, as schema 5's ingest committed them."""
        phone = phone_for(i).replace("-", "")
        row = self.pg.query(f"""
            WITH a AS (
              INSERT INTO applications (event_id, phone, name, seats)
              VALUES ('{SHOW}', '{phone}', 'Customer {i}', 1)
              RETURNING id, event_id, phone, name, email, seats, created_at)
            INSERT INTO outbox (aggregate_id, event_type, payload, created_at)
            SELECT id, 'TicketApplied',
                   json_build_object('id', id, 'event_id', event_id, 'phone', phone,
                                     'name', name, 'email', email, 'seats', seats,
                                     'created_at', created_at)::jsonb, created_at
              FROM a
            RETURNING id, aggregate_id, event_id::text, payload::text""")[0]
        return {"id": int(row[0]), "app": int(row[1]), "ce_id": row[2], "payload": row[3]}

    def test_schema_5_database_upgrades_and_audits_complete(self):
        self.migrate("to", "5")
        self.assertEqual(self.pg.scalar("SELECT max(version) FROM schema_migrations"), "5")
        km = self.track(KafkaMock(partitions=PARTS))
        rows = [self.new_application(i) for i in range(12)]
        # The old relay: produce, then mark from the acknowledgement (one UPDATE per round).
        old_published = [r for i, r in enumerate(rows) if i not in (3, 7, 10)]
        for i, r in enumerate(old_published):
            kcat_produce(km.brokers, TOPIC, r["payload"], key=r["app"], partition=i % PARTS,
                         headers={"ce_specversion": "1.0", "ce_id": r["ce_id"],
                                  "ce_source": "/ticketd", "ce_type": "TicketApplied",
                                  "content-type": "application/json"})
        msgs = kcat_consume(km.brokers, TOPIC, expect=len(old_published))
        pos = {m["headers"]["ce_id"]: (m["partition"], m["offset"]) for m in msgs}
        for half in (old_published[:5], old_published[5:]):
            values = ", ".join(f"('{r['ce_id']}'::uuid, {pos[r['ce_id']][0]}, {pos[r['ce_id']][1]})"
                               for r in half)
            self.pg.execute(
                "UPDATE outbox o SET published_at = now(), kafka_partition = u.p,"
                f" kafka_offset = u.off, attempts = 1 FROM (VALUES {values}) AS u(e, p, off)"
                " WHERE o.event_id = u.e AND o.published_at IS NULL")

        self.migrate()
        self.assertEqual(self.pg.scalar("SELECT max(version) FROM schema_migrations"), "6")
        self.assertEqual(self.pg.count(
            "pg_indexes WHERE indexname IN ('outbox_unpublished_idx', 'outbox_published_idx')"), 0)
        # The old marks are records, one per (partition, UPDATE), at the same positions.
        got = {r[0]: (int(r[1]), int(r[2])) for r in self.pg.query(
            "SELECT event_id::text, kafka_partition, kafka_offset FROM outbox_status"
            " WHERE published_at IS NOT NULL")}
        self.assertEqual(got, {r["ce_id"]: pos[r["ce_id"]] for r in old_published})
        self.assertLessEqual(self.pg.count("outbox_publications"), 2 * PARTS)
        self.assertEqual(int(self.pg.scalar("SELECT cursor_id FROM relay_lease")),
                         rows[3]["id"] - 1, "the cursor starts below the first unpublished row")

        group = unique_group("upgrade")
        td = self.track(Ticketd(self.pg, brokers=km.brokers, role="relay,consumer",
                                env={"CONSUMER_GROUP": group, "RELAY_INTERVAL": "100ms"}))
        wait_until(lambda: self.pg.count("outbox_status WHERE published_at IS NULL") == 0,
                   timeout=90, what="the rows left unpublished by schema 5 published")
        wait_until(lambda: self.pg.count("processed_events") == len(rows), timeout=120,
                   what="every event processed")
        wait_until(lambda: self.pg.count("event_effects WHERE NOT done") == 0, timeout=120,
                   what="every effect done")
        # Records made by the migration keep their positions (re-sent copies add records).
        again = {r[0]: (int(r[1]), int(r[2])) for r in self.pg.query(
            "SELECT event_id::text, kafka_partition, kafka_offset FROM outbox_status")}
        for r in old_published:
            self.assertEqual(again[r["ce_id"]], pos[r["ce_id"]])
        td.terminate(timeout=60)
        a = run_ticketd(["audit", "--json"], timeout=180,
                        env={"DATABASE_URL": self.pg.url, "KAFKA_BROKERS": km.brokers,
                             "CONSUMER_GROUP": group, "AUDIT_GRACE": "10s", "LOG_LEVEL": "warn"})
        report = json.loads(a.stdout or "{}")
        self.assertEqual(report.get("verdict"), "complete", a.stdout[-3000:] + a.stderr[-2000:])
        self.assertEqual(a.returncode, 0)


if __name__ == "__main__":
    unittest.main()
