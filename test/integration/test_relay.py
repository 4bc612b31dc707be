"""The outbox relay (issue 3): every committed application reaches topic ticket-applied, and
its outbox row is marked published only from the broker's acknowledgement, with the
partition and offset where kcat (an independent client) finds the message.

Kafka is `ticketd kafka-mock` (librdkafka's mock cluster); broker reconnects after `up`
take several seconds there (KAFKA-MOCK.md), hence the generous bounded waits."""
import json
import os
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Ticketd, KafkaMock, TicketdTestCase, kcat_consume, parallel,  # noqa: E402
                     phone_for, publication_record_sql, run_ticketd, wait_until)

TOPIC = "ticket-applied"
RELAY_ENV = {"ROLE": "api,relay", "RELAY_RETRY_BACKOFF": "200ms"}
RECONNECT_WAIT = 60  # s: broker back up -> delivered takes ~9 s on the mock; keep margin


class RelayTest(TicketdTestCase):

    def setUp(self):
        self.reset_db()
        self.kafka = self.track(KafkaMock(partitions=4))

    # ---------------------------------------------------------------- helpers

    def start(self, env=None, name="ticketd"):
        e = dict(RELAY_ENV)
        e.update(env or {})
        return self.track(Ticketd(self.pg, brokers=self.kafka.brokers, env=e, name=name))

    def apply_many(self, t, event_id, n, start=0):
        """n applications in parallel; asserts every one got 201; returns their ids."""
        def one(i):
            return t.apply(event_id=event_id, phone=phone_for(i), name=f"Relay Tester {i}",
                           email=f"user{i}@example.com" if i % 2 else None, seats=1 + i % 4)
        rs = parallel(one, range(start, start + n), workers=16)
        for r in rs:
            self.assertEqual(r.status, 201, r)
        return [self.pg.application_id(r.json()) for r in rs]

    def unpublished(self):
        return self.pg.count("outbox_status WHERE published_at IS NULL")

    def wait_all_published(self, timeout=RECONNECT_WAIT):
        wait_until(lambda: self.pg.count("outbox") > 0 and self.unpublished() == 0,
                   timeout=timeout, interval=0.2,
                   what=f"every outbox row published (unpublished={self.unpublished()})")

    def outbox_rows(self):
        """{ce_id: row} for every outbox row."""
        rows = self.pg.query(
            "SELECT event_id::text, aggregate_id, payload::text, kafka_partition, kafka_offset,"
            " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
            " published_at IS NOT NULL, attempts, last_error FROM outbox_status")
        out = {}
        for ce_id, agg, payload, part, off, created, published, attempts, err in rows:
            out[ce_id] = {"aggregate_id": agg, "payload": json.loads(payload),
                          "partition": None if part is None else int(part),
                          "offset": None if off is None else int(off), "created_at": created,
                          "published": published == "t", "attempts": int(attempts),
                          "last_error": err}
        return out

    def assert_topic_matches_outbox(self, expect_n, allow_duplicates=False):
        """kcat reads the topic; every outbox row's event is there exactly once (or, with
        allow_duplicates, repeats carry the same ce_id, key and value), with the right key,
        headers and value, and the row's partition/offset point at a copy of it."""
        rows = self.outbox_rows()
        self.assertEqual(len(rows), expect_n)
        msgs = kcat_consume(self.kafka.brokers, TOPIC, expect=expect_n, timeout=RECONNECT_WAIT)
        by_pos = {(m["partition"], m["offset"]): m for m in msgs}
        by_id = {}
        for m in msgs:
            by_id.setdefault(m["headers"].get("ce_id"), []).append(m)
        self.assertEqual(set(by_id), set(rows), "the topic's ce_ids are not the outbox's")
        if not allow_duplicates:
            self.assertEqual(len(msgs), expect_n, "a message was produced more than once")
        for ce_id, row in rows.items():
            self.assertTrue(row["published"], ce_id)
            for m in by_id[ce_id]:
                self.assertEqual(m["key"], row["aggregate_id"])
                self.assertEqual(json.loads(m["value"]), row["payload"])
                self.assertEqual(m["headers"], {
                    "ce_specversion": "1.0", "ce_id": ce_id, "ce_source": "/ticketd",
                    "ce_type": "TicketApplied", "ce_time": row["created_at"],
                    "content-type": "application/json"})
            at = by_pos.get((row["partition"], row["offset"]))
            self.assertIsNotNone(at, f"row {ce_id} points at {row['partition']}/{row['offset']},"
                                     " where kcat found nothing")
            self.assertEqual(at["headers"]["ce_id"], ce_id,
                             f"row {ce_id} points at another event's message")
        return msgs

    def metric(self, t, name):
        return t.metrics().get(name, 0.0)

    # ---------------------------------------------------------------- tests

    def test_every_application_reaches_the_topic_where_its_row_says(self):
        t = self.start()
        n = 40
        ids = self.apply_many(t, "relay-basic", n)
        self.wait_all_published(timeout=30)
        self.assert_topic_matches_outbox(n)
        # The payload is the application as stored.
        rows = self.outbox_rows()
        for row in rows.values():
            self.assertIn(int(row["aggregate_id"]), ids)
            self.assertEqual(row["payload"]["id"], int(row["aggregate_id"]))
            self.assertEqual(row["payload"]["event_id"], "relay-basic")
        # GET shows published with the row's partition and offset.
        some = ids[0]
        body = t.admin("GET", f"/admin/applications/{some}").json()
        self.assertEqual(body["status"], "published")
        row = [r for r in rows.values() if int(r["aggregate_id"]) == some][0]
        self.assertEqual(body["outbox"]["partition"], row["partition"])
        self.assertEqual(body["outbox"]["offset"], row["offset"])
        self.assertEqual(self.metric(t, "ticketd_relay_published_total"), n)
        self.assertEqual(self.metric(t, "ticketd_relay_active"), 1)

    def test_brokers_down_during_a_burst_nothing_marked_until_acknowledged(self):
        t = self.start()
        self.kafka.down()
        n = 30
        self.apply_many(t, "relay-down", n)  # 201s go on: the outbox decouples ingest
        time.sleep(3)  # the relay has claimed and produced by now; nothing can be acked
        self.assertEqual(self.pg.count("outbox_status WHERE published_at IS NOT NULL"), 0,
                         "a row was marked published while every broker was down")
        self.assertEqual(self.pg.count("outbox"), n)
        up_at = self.pg.scalar("SELECT now()")
        self.kafka.up()
        self.wait_all_published()
        self.assertEqual(self.pg.count(f"outbox_status WHERE published_at < '{up_at}'"), 0,
                         "a row was marked published before the brokers came back")
        self.assert_topic_matches_outbox(n, allow_duplicates=True)

    def test_a_delivery_that_keeps_failing_is_never_marked_published(self):
        t = self.start()
        # The mock fails every Produce request with TOPIC_AUTHORIZATION_FAILED (29), a
        # non-retriable error: librdkafka reports the delivery as failed.
        self.kafka.command("produce-errors 100000 29")
        ids = self.apply_many(t, "relay-fail", 3)
        wait_until(lambda: self.pg.count("outbox WHERE attempts >= 2") == 3, timeout=30,
                   what="failed deliveries recorded and retried")
        rows = self.outbox_rows()
        for row in rows.values():
            self.assertFalse(row["published"], "a failed delivery was marked published")
            self.assertIsNone(row["partition"])
            self.assertIsNone(row["offset"])
            self.assertIn("authoriz", (row["last_error"] or "").lower())
        self.assertEqual(kcat_consume(self.kafka.brokers, TOPIC), [])
        self.assertGreaterEqual(self.metric(t, "ticketd_relay_failures_total"), 6)
        body = t.admin("GET", f"/admin/applications/{ids[0]}").json()
        self.assertEqual(body["status"], "applied")
        # Once the broker accepts again, the retries get through.
        self.kafka.command("clear-errors")
        self.wait_all_published(timeout=RECONNECT_WAIT)
        self.assert_topic_matches_outbox(3)

    def test_sigkill_mid_relay_then_restart_loses_nothing(self):
        t = self.start()
        self.apply_many(t, "relay-kill", 20)
        self.wait_all_published(timeout=30)
        # Brokers down: the next rows are produced and wait for acknowledgements that
        # cannot come; the process dies with them in flight.
        self.kafka.down()
        self.apply_many(t, "relay-kill", 30, start=20)
        time.sleep(1.5)  # claimed and produced (NOTIFY wakes the relay at once)
        t.kill()
        self.assertEqual(self.unpublished(), 30)
        self.kafka.up()
        t2 = self.start(name="ticketd-restarted")
        self.apply_many(t2, "relay-kill", 10, start=50)
        self.wait_all_published()
        self.assert_topic_matches_outbox(60, allow_duplicates=True)

    def test_two_processes_one_relays_at_a_time_and_the_other_takes_over(self):
        a = self.start(name="ticketd-a")
        wait_until(lambda: self.metric(a, "ticketd_relay_active") == 1, timeout=15,
                   what="a active")
        b = self.start(name="ticketd-b")
        # b stays standby while a holds the lock (b retries every RELAY_INTERVAL).
        for _ in range(6):
            self.assertEqual(self.metric(b, "ticketd_relay_active"), 0)
            self.assertEqual(self.metric(a, "ticketd_relay_active"), 1)
            time.sleep(0.5)
        self.apply_many(b, "relay-ha", 20)  # b's API takes applications; a publishes them
        self.wait_all_published(timeout=30)
        self.assertEqual(self.metric(a, "ticketd_relay_published_total"), 20)
        self.assertEqual(self.metric(b, "ticketd_relay_published_total"), 0)
        a.kill()
        wait_until(lambda: self.metric(b, "ticketd_relay_active") == 1, timeout=15,
                   what="b takes over after a died")
        self.assertIn("became_active", b.log_text())
        self.apply_many(b, "relay-ha", 20, start=20)
        self.wait_all_published(timeout=30)
        self.assertGreaterEqual(self.metric(b, "ticketd_relay_published_total"), 20)
        self.assert_topic_matches_outbox(40)

    def load_in_background(self, t, event_id, start, stop_event, workers=16):
        """Applies continuously (distinct phones from start) until stop_event is set; returns
        the thread and a list that collects the statuses."""
        import threading
        statuses, lock = [], threading.Lock()
        counter = iter(range(start, start + 10**6))

        def worker():
            while not stop_event.is_set():
                with lock:
                    i = next(counter)
                r = t.apply(event_id=event_id, phone=phone_for(i), name=f"Load {i}")
                with lock:
                    statuses.append(r.status)
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for th in threads:
            th.start()
        return threads, statuses

    def test_a_small_inflight_max_never_stalls_the_relay(self):
        """Issue 11 item 1: with a backlog bigger than RELAY_INFLIGHT_MAX, rows marked
        published stayed in the map until a claim returned, and no claim was sent while the
        map was full: the relay stopped for good after the first RELAY_INFLIGHT_MAX rows."""
        t = self.start(env={"RELAY_INFLIGHT_MAX": "50", "RELAY_BATCH": "200"})
        self.kafka.down()  # the burst piles up as a backlog several times the map's size
        n = 600
        self.apply_many(t, "relay-small-map", n)
        self.kafka.up()
        self.wait_all_published(timeout=RECONNECT_WAIT)
        self.assert_topic_matches_outbox(n, allow_duplicates=True)

    def test_brokers_down_during_load_the_backlog_drains(self):
        """Issue 11 item 1: all brokers down for 3 s while applications keep coming; once
        they are back every row is published (the backlog exceeds the in-flight map)."""
        import threading
        t = self.start(env={"RELAY_INFLIGHT_MAX": "200", "RELAY_BATCH": "100"})
        stop = threading.Event()
        threads, statuses = self.load_in_background(t, "relay-down-load", 0, stop)
        wait_until(lambda: len(statuses) >= 200, timeout=30, what="load running")
        self.kafka.down()
        time.sleep(3)  # the outage itself, not a wait for a condition
        self.kafka.up()
        time.sleep(2)  # load goes on after the brokers are back
        stop.set()
        for th in threads:
            th.join(timeout=30)
        self.assertTrue(statuses and all(s == 201 for s in statuses), set(statuses))
        n = len(statuses)
        self.assertEqual(self.pg.count("outbox"), n)
        self.wait_all_published(timeout=RECONNECT_WAIT)
        self.assert_topic_matches_outbox(n, allow_duplicates=True)

    def positions(self):
        return self.pg.query("SELECT id, kafka_partition, kafka_offset, published_at FROM outbox_status"
                             " ORDER BY id")

    def test_a_frozen_leader_loses_its_lease_and_a_standby_takes_over(self):
        """Issue 11 item 2: leadership was a session advisory lock that a SIGSTOPped process
        kept (its backend stays idle and connected); now it is a lease that the standby
        claims once the leader stops renewing it, and the old leader, woken up, marks
        nothing."""
        env = {"RELAY_LEASE_TTL": "3s"}
        a = self.start(env, name="ticketd-a")
        wait_until(lambda: self.metric(a, "ticketd_relay_active") == 1, timeout=15,
                   what="a active")
        b = self.start(env, name="ticketd-b")
        self.apply_many(b, "relay-lease", 20)
        self.wait_all_published(timeout=30)
        self.assertEqual(self.metric(b, "ticketd_relay_active"), 0)
        # Rows in a's hands when it freezes: produced while no broker can acknowledge them.
        self.kafka.down()
        self.apply_many(b, "relay-lease", 20, start=20)
        time.sleep(1.5)  # a claims and produces them (NOTIFY wakes it at once)
        marked_by_a = self.metric(a, "ticketd_relay_marked_total")
        a.signal(signal.SIGSTOP)
        try:
            self.kafka.up()
            self.apply_many(b, "relay-lease", 20, start=40)
            wait_until(lambda: self.metric(b, "ticketd_relay_active") == 1, timeout=40,
                       what="b takes the lease over from the frozen a")
            self.wait_all_published(timeout=RECONNECT_WAIT)
            published = self.positions()
        finally:
            a.signal(signal.SIGCONT)
        # a notices it lost the lease, stays standby, and marks nothing; b keeps publishing.
        wait_until(lambda: self.metric(a, "ticketd_relay_active") == 0, timeout=15,
                   what="a knows it is no longer active")
        for _ in range(8):
            self.assertEqual(self.metric(a, "ticketd_relay_active"), 0)
            self.assertEqual(self.metric(b, "ticketd_relay_active"), 1)
            self.assertEqual(self.metric(a, "ticketd_relay_marked_total"), marked_by_a,
                             "the old leader marked rows after losing its lease")
            time.sleep(0.5)
        self.assertEqual(self.positions(), published, "a row's recorded position changed")
        self.apply_many(a, "relay-lease", 10, start=60)  # through the woken one: b publishes
        self.wait_all_published(timeout=30)
        self.assertEqual(self.metric(a, "ticketd_relay_marked_total"), marked_by_a)
        self.assert_topic_matches_outbox(70, allow_duplicates=True)
        self.assertIn("lease", a.log_text())

    def test_retention_deletes_only_old_rows_whose_event_is_accounted_for(self):
        """Issue 11 item 7: retention deleted every old published row, processed or not,
        and with it the audit's evidence of an event nobody consumed. Now it deletes only
        rows whose event was processed (every effect done) or dead-lettered."""
        r = run_ticketd(["migrate"], env={"DATABASE_URL": self.pg.url})
        self.assertEqual(r.returncode, 0, r.stderr)
        # 2,500 published rows older than the retention, processed (more than two delete
        # batches), plus single old published rows in every other state.
        self.pg.execute(
            "INSERT INTO outbox (aggregate_id, event_type, payload, created_at)"
            " SELECT g, 'TicketApplied', '{}'::jsonb, now() - interval '9 days'"
            " FROM generate_series(1, 2500) g")
        eight_days = "now() - interval '8 days'"
        self.pg.execute(publication_record_sql("true", 0, "o.aggregate_id", eight_days))
        self.pg.execute(
            "INSERT INTO processed_events (event_id, consumer_group, topic, partition, \"offset\")"
            " SELECT event_id, 'g', 'ticket-applied', 0, aggregate_id FROM outbox")
        self.pg.execute(
            "INSERT INTO outbox (aggregate_id, event_type, payload, created_at)"
            " SELECT a, 'TicketApplied', '{}'::jsonb, now() - interval '9 days'"
            " FROM unnest('{900003,900004,900005}'::bigint[]) a")
        self.pg.execute(publication_record_sql("o.aggregate_id > 900000", 1, "o.aggregate_id",
                                               eight_days))
        ev = {a: self.pg.scalar(f"SELECT event_id FROM outbox WHERE aggregate_id = {a}")
              for a in (900003, 900004, 900005)}
        # 900003 dead-lettered: deletable. 900004 processed, an effect still open: kept.
        # 900005 never consumed: kept.
        self.pg.execute(
            "INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition,"
            " src_offset, dlq_partition, dlq_offset, attempts, error_class, error_message)"
            f" VALUES ('{ev[900003]}', 900003, 'ticket-applied', 1, 900003, 0, 0, 3, 'x', 'y')")
        self.pg.execute(
            "INSERT INTO processed_events (event_id, consumer_group, topic, partition, \"offset\")"
            f" VALUES ('{ev[900004]}', 'g', 'ticket-applied', 1, 900004)")
        self.pg.execute(
            "INSERT INTO event_effects (event_id, effect, application_id, done)"
            f" VALUES ('{ev[900004]}', 'email', 900004, false)")
        self.pg.execute(
            "INSERT INTO outbox (aggregate_id, event_type, payload, created_at) VALUES"
            " (900001, 'TicketApplied', '{}'::jsonb, now() - interval '9 days')")
        self.pg.execute(publication_record_sql("o.aggregate_id = 900001", 0, "1"))
        # Old and never published: must survive retention (the relay publishes it instead).
        self.pg.execute(
            "INSERT INTO outbox (aggregate_id, event_type, payload, created_at)"
            " VALUES (900002, 'TicketApplied', '{\"id\":900002}'::jsonb, now() - interval '30 days')")
        self.start(env={"OUTBOX_RETENTION": "7d"})
        wait_until(lambda: self.pg.count("outbox WHERE aggregate_id <= 2500") == 0,
                   timeout=30, what="old processed rows deleted")
        wait_until(lambda: self.pg.count("outbox WHERE aggregate_id = 900003") == 0,
                   timeout=30, what="old dead-lettered row deleted")
        self.wait_all_published(timeout=30)
        self.assertEqual(
            sorted(int(a) for (a,) in self.pg.query("SELECT aggregate_id FROM outbox")),
            [900001, 900002, 900004, 900005])
        # Old records go once none of their rows is left (the 2,500 rows' one), not before
        # (the one of 900003-900005: 900004 and 900005 are still there).
        old = "outbox_publications WHERE published_at < now() - interval '7 days'"
        wait_until(lambda: self.pg.count(old) == 1, timeout=30,
                   what="the old record of the deleted rows deleted")
        self.assertEqual(self.pg.count(old + " AND kafka_partition = 1 AND cardinality(ids) = 3"),
                         1, "the record of rows still there is kept")

    def test_kafka_config_errors_name_the_property_never_the_value(self):
        r = run_ticketd(["serve"], env={
            "DATABASE_URL": self.pg.url, "KAFKA_BROKERS": self.kafka.brokers, "ROLE": "api,relay",
            "LISTEN": "127.0.0.1:0", "KAFKA_CONFIG": "sasl.password=s3cr3t-value,no.such.prop=hunter2"},
            timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no.such.prop", r.stderr)
        self.assertNotIn("hunter2", r.stderr + r.stdout)
        self.assertNotIn("s3cr3t-value", r.stderr + r.stdout)


if __name__ == "__main__":
    unittest.main()
