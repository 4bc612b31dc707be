"""Issue 5: `ticketd audit`, `ticketd trace`, GET /admin/audit and GET /admin/trace.

Every test builds the state of the pipeline by hand — application and outbox rows with psql,
messages produced with kcat (with CloudEvents headers) to a fresh `ticketd kafka-mock`, the
consumer group's offsets committed by a kcat group consumer — then makes one kind of loss and
checks that the audit names exactly the application(s) concerned and exits non-zero, and
that `trace` tells that customer's story. A clean run must report 0 missing and exit 0.
"""
import json
import os
import re
import subprocess
import sys
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (ADMIN_TOKEN, KafkaMock, Ticketd, TicketdTestCase, kcat_consume,  # noqa: E402
                     kcat_produce, phone_for, publication_record_sql as record_sql,
                     run_ticketd, unique_group, wait_until)

TOPIC = "ticket-applied"
DLQ = "ticket-applied.DLQ"
PARTS = 4
SHOW = "concert-2026"


class AuditTest(TicketdTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        r = run_ticketd(["migrate"], env={"DATABASE_URL": cls.pg.url})
        if r.returncode != 0:
            raise RuntimeError(f"migrate failed: {r.stderr}")

    def setUp(self):
        self.reset_db()
        self.km = self.track(KafkaMock(partitions=PARTS))
        self.group = unique_group("audit")
        self.env = {"DATABASE_URL": self.pg.url, "KAFKA_BROKERS": self.km.brokers,
                    "CONSUMER_GROUP": self.group, "AUDIT_GRACE": "10s", "LOG_LEVEL": "warn"}
        self.apps = {}   # application id -> {"phone", "ce_id", "payload", "partition"}
        self.next_phone = 1

    # ------------------------------------------------------------------ building the state

    def new_application(self, show=SHOW, age_s=0):
        """An application row and its outbox row in one statement (what ingest commits)."""
        phone = phone_for(self.next_phone).replace("-", "")
        self.next_phone += 1
        row = self.pg.query(f"""
            WITH a AS (
              INSERT INTO applications (event_id, phone, name, seats, created_at)
              VALUES ('{show}', '{phone}', 'Customer {phone[-4:]}', 1,
                      now() - interval '{age_s} seconds')
              RETURNING id, event_id, phone, name, email, seats, created_at)
            INSERT INTO outbox (aggregate_id, event_type, payload, created_at)
            SELECT id, 'TicketApplied',
                   json_build_object('id', id, 'event_id', event_id, 'phone', phone,
                                     'name', name, 'email', email, 'seats', seats,
                                     'created_at', created_at)::jsonb, created_at
              FROM a
            RETURNING aggregate_id, event_id, payload::text""")[0]
        app_id = int(row[0])
        self.apps[app_id] = {"phone": phone, "ce_id": row[1], "payload": row[2],
                             "partition": None}
        return app_id

    def produce(self, app_id, partition, topic=TOPIC, extra_headers=None, value=None):
        a = self.apps[app_id]
        headers = {"ce_specversion": "1.0", "ce_id": a["ce_id"], "ce_source": "/ticketd",
                   "ce_type": "TicketApplied", "content-type": "application/json"}
        headers.update(extra_headers or {})
        kcat_produce(self.km.brokers, topic, value or a["payload"], key=app_id, headers=headers,
                     partition=partition)
        if topic == TOPIC:
            a["partition"] = partition

    def record_offsets(self):
        """Marks every produced row published at the position kcat reads it back from."""
        produced = {a["ce_id"]: i for i, a in self.apps.items() if a["partition"] is not None}
        msgs = kcat_consume(self.km.brokers, TOPIC, expect=len(produced))
        for m in msgs:
            ce = m["headers"].get("ce_id")
            if ce in produced:
                self.pg.execute(f"UPDATE outbox SET attempts = 1 WHERE event_id = '{ce}'")
                self.pg.execute(record_sql(f"event_id = '{ce}' AND o.id NOT IN (SELECT id FROM"
                                           f" outbox_status WHERE published_at IS NOT NULL)",
                                           m['partition'], m['offset']))
                self.apps[produced[ce]]["offset"] = m["offset"]

    def process(self, app_id):
        """What the consumer records for a handled event: processed row, effects, points."""
        a = self.apps[app_id]
        row = self.pg.query(f"SELECT kafka_partition, kafka_offset FROM outbox_status"
                            f" WHERE event_id = '{a['ce_id']}'")[0]
        self.pg.execute(f"""
            INSERT INTO processed_events (event_id, consumer_group, topic, partition, "offset")
              VALUES ('{a['ce_id']}', '{self.group}', '{TOPIC}', {row[0]}, {row[1]});
            INSERT INTO points_ledger (event_id, application_id, phone, points)
              VALUES ('{a['ce_id']}', {app_id}, '{a['phone']}', 10);
            INSERT INTO event_effects (event_id, effect, application_id, done, attempts)
              VALUES ('{a['ce_id']}', 'points', {app_id}, true, 1),
                     ('{a['ce_id']}', 'data_platform', {app_id}, true, 1)""")

    def commit_group(self):
        """Commits the group's offsets at the end of every partition (a kcat group consumer
        that reads everything and commits as it closes)."""
        r = subprocess.run(["kcat", "-b", self.km.brokers, "-G", self.group,
                            "-X", "auto.offset.reset=earliest", "-X", "session.timeout.ms=6000",
                            "-X", "auto.commit.interval.ms=100", "-e", "-q", "-f", "%p %o\n",
                            TOPIC], capture_output=True, text=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)

    def healthy(self, n, show=SHOW):
        """n applications published round-robin over the partitions, processed, committed."""
        ids = [self.new_application(show=show) for _ in range(n)]
        for k, app_id in enumerate(ids):
            self.produce(app_id, k % PARTS)
        self.record_offsets()
        for app_id in ids:
            self.process(app_id)
        return ids

    # ------------------------------------------------------------------ running the tools

    def audit(self, *args, env=None):
        e = dict(self.env)
        e.update(env or {})
        r = run_ticketd(["audit", "--json"] + list(args), env=e, timeout=180)
        self.assertIn(r.returncode, (0, 1), f"audit failed:\n{r.stderr}")
        report = json.loads(r.stdout)
        # The exit status and the verdict agree: 0 only when complete.
        self.assertEqual(r.returncode == 0, report.get("verdict") == "complete", r.stdout)
        if report["missing"]:
            self.assertEqual(report["verdict"], "incomplete")
        return r.returncode, report

    def audit_human(self, *args):
        r = run_ticketd(["audit"] + list(args), env=self.env, timeout=180)
        self.assertIn(r.returncode, (0, 1), r.stderr)
        return r.returncode, r.stdout.strip().splitlines()

    def trace(self, phone, *args):
        r = run_ticketd(["trace", "--phone", phone, "--json"] + list(args), env=self.env,
                        timeout=180)
        self.assertIn(r.returncode, (0, 1), f"trace failed:\n{r.stderr}")
        return r.returncode, json.loads(r.stdout)

    @staticmethod
    def cat(report, stage, name):
        return report["stages"][stage][name]

    def cat_ids(self, report, stage, name):
        c = self.cat(report, stage, name)
        self.assertFalse(c["truncated"])
        return sorted(i["application_id"] for i in c["items"])

    def assert_only(self, report, stage, name, ids):
        """The audit names exactly these applications, at this stage, and nowhere else."""
        self.assertEqual(self.cat_ids(report, stage, name), sorted(ids), json.dumps(report))
        self.assertEqual(sorted(report["missing_ids"]), sorted(ids))
        self.assertEqual(report["missing"], len(ids))
        self.assertEqual(report["verdict"], "incomplete")
        missing_cats = {("applications_outbox", "without_outbox"),
                        ("applications_outbox", "outbox_without_application"),
                        ("outbox_kafka", "unpublished"), ("outbox_kafka", "not_in_topic"),
                        ("outbox_kafka", "wrong_offset"), ("outbox_kafka", "topic_without_row"),
                        ("kafka_consumer", "unhandled"), ("kafka_consumer", "effects_not_done"),
                        ("kafka_consumer", "dead_lettered"),
                        ("applications_outbox", "pruned_unaccounted"),
                        ("outbox_kafka", "expired_unconsumed"), ("kafka_consumer", "not_consumed")}
        for st, nm in missing_cats - {(stage, name)}:
            self.assertEqual(self.cat(report, st, nm)["count"], 0, f"{st}.{nm}: {report}")

    def trace_entry(self, app_id):
        """The trace of one application's phone -> (report, application, latest outbox row)."""
        rc, t = self.trace(self.apps[app_id]["phone"])
        self.assertEqual(rc, 0)
        apps = [a for a in t["applications"] if a["id"] == app_id]
        self.assertEqual(len(apps), 1, t)
        rows = apps[0]["outbox"]
        return t, apps[0], (rows[-1] if rows else None)

    # ------------------------------------------------------------------ tests

    def test_clean_run_reports_nothing_missing(self):
        ids = self.healthy(8)
        self.commit_group()
        rc, report = self.audit()
        self.assertEqual(rc, 0, json.dumps(report, indent=1))
        self.assertEqual(report["verdict"], "complete")
        self.assertEqual(report["applications"], 8)
        self.assertEqual(report["missing_ids"], [])
        s2 = report["stages"]["outbox_kafka"]
        self.assertEqual((s2["published"], s2["verified"], s2["topic_messages"]), (8, 8, 8))
        s3 = report["stages"]["kafka_consumer"]
        self.assertEqual(s3["processed"], 8)
        self.assertEqual(s3["lag"], 0)
        for p in s3["partitions"]:
            self.assertEqual(p["committed"], p["high"], p)   # read back from the group
        rc, lines = self.audit_human()
        self.assertEqual(rc, 0)
        self.assertEqual(lines[-1], "complete: 8 applications, 0 missing")
        _, app, row = self.trace_entry(ids[3])
        self.assertEqual(app["status"], "processed")
        self.assertTrue(row["topic_record"]["found"])
        self.assertEqual(row["topic_record"]["ce_id"], self.apps[ids[3]]["ce_id"])
        self.assertEqual(row["topic_record"]["key"], str(ids[3]))
        self.assertEqual(row["points"]["points"], 10)

    def test_deleted_outbox_row(self):
        ids = self.healthy(6)
        self.commit_group()
        lost = ids[2]
        self.pg.execute(f"DELETE FROM outbox WHERE aggregate_id = {lost}")
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        self.assertEqual(self.cat_ids(report, "applications_outbox", "without_outbox"), [lost])
        # Its message is still in the topic, now with no row: named by its key.
        orphans = self.cat(report, "outbox_kafka", "topic_without_row")["items"]
        self.assertEqual([o["key"] for o in orphans], [str(lost)])
        self.assertEqual(report["missing_ids"], [lost])
        rc, lines = self.audit_human()
        self.assertEqual(rc, 1)
        self.assertEqual(lines[-1], f"incomplete: 6 applications, 1 missing: {lost}")
        t, app, row = self.trace_entry(lost)
        self.assertIsNone(row)
        self.assertEqual(app["status"], "no_outbox")
        self.assertTrue(t["scanned"])
        found = [m for m in t["topic_matches"] if m["topic"] == TOPIC]
        self.assertEqual([m["ce_id"] for m in found], [self.apps[lost]["ce_id"]])
        self.assertFalse(found[0]["in_outbox"])

    def processed_without_outbox(self, app_id):
        """What the consumer left of an event whose outbox row was then pruned."""
        a = self.apps[app_id]
        self.pg.execute(f"""
            INSERT INTO points_ledger (event_id, application_id, phone, points)
              VALUES ('{a['ce_id']}', {app_id}, '{a['phone']}', 10);
            INSERT INTO event_effects (event_id, effect, application_id, done, attempts)
              VALUES ('{a['ce_id']}', 'points', {app_id}, true, 1)""")

    def test_outbox_row_pruned_after_retention_is_not_missing(self):
        self.healthy(3)
        self.commit_group()
        old = self.new_application(age_s=8 * 86400)   # OUTBOX_RETENTION defaults to 7 days
        self.processed_without_outbox(old)
        self.pg.execute(f"DELETE FROM outbox WHERE aggregate_id = {old}")
        rc, report = self.audit()
        self.assertEqual(rc, 0, json.dumps(report))
        self.assertEqual(report["stages"]["applications_outbox"]["outbox_pruned"], 1)
        _, app, _ = self.trace_entry(old)
        self.assertEqual(app["status"], "outbox_pruned")
        # With a longer retention the same row is missing.
        rc, report = self.audit(env={"OUTBOX_RETENTION": "30d"})
        self.assertEqual(rc, 1)
        self.assert_only(report, "applications_outbox", "without_outbox", [old])

    def test_marked_published_but_not_in_topic(self):
        self.healthy(5)
        ghost = self.new_application()
        self.pg.execute(record_sql(f"aggregate_id = {ghost}", 1, 500))
        self.commit_group()
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        self.assert_only(report, "outbox_kafka", "not_in_topic", [ghost])
        _, app, row = self.trace_entry(ghost)
        self.assertEqual(app["status"], "not_in_topic")
        self.assertFalse(row["topic_record"]["found"])
        self.assertIn("MISSING FROM THE TOPIC", row["story"])

    def test_row_pointing_at_a_wrong_offset(self):
        ids = self.healthy(8)
        self.commit_group()
        # ids[0] and ids[4] both went to partition 0 (round-robin over 4 partitions).
        wrong, other = ids[0], ids[4]
        self.assertEqual(self.apps[wrong]["partition"], self.apps[other]["partition"])
        self.pg.execute(f"UPDATE outbox_publications SET offsets[1] = {self.apps[other]['offset']}"
                        f" WHERE ids = ARRAY(SELECT id FROM outbox WHERE aggregate_id = {wrong})")
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        self.assert_only(report, "outbox_kafka", "wrong_offset", [wrong])
        item = self.cat(report, "outbox_kafka", "wrong_offset")["items"][0]
        self.assertEqual(item["found_ce_id"], self.apps[other]["ce_id"])
        # The real message of `wrong` is reported as recorded elsewhere, not as missing.
        elsewhere = self.cat(report, "outbox_kafka", "recorded_elsewhere")["items"]
        self.assertEqual([e["event_id"] for e in elsewhere], [self.apps[wrong]["ce_id"]])
        _, app, row = self.trace_entry(wrong)
        self.assertEqual(app["status"], "wrong_offset")
        self.assertEqual(row["topic_record"]["ce_id"], self.apps[other]["ce_id"])
        _, app, _ = self.trace_entry(other)
        self.assertEqual(app["status"], "processed")

    def test_processed_row_deleted_below_committed_offset(self):
        ids = self.healthy(6)
        self.commit_group()
        lost = ids[5]
        self.pg.execute(f"DELETE FROM processed_events WHERE event_id = '{self.apps[lost]['ce_id']}'")
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        self.assert_only(report, "kafka_consumer", "unhandled", [lost])
        _, app, row = self.trace_entry(lost)
        self.assertEqual(app["status"], "lost")
        self.assertIn("LOST BY THE CONSUMER", row["story"])
        self.assertIsNotNone(row["group_committed_offset"])

    def test_event_in_topic_without_db_row(self):
        self.healthy(4)
        self.commit_group()
        stray_phone = "01099998888"
        ce = str(uuid.uuid4())
        value = json.dumps({"id": 424242, "event_id": SHOW, "phone": stray_phone, "name": "Stray",
                            "email": None, "seats": 1, "created_at": "2026-11-26T19:40:00Z"})
        kcat_produce(self.km.brokers, TOPIC, value, key=424242, partition=2,
                     headers={"ce_id": ce, "ce_type": "TicketApplied"})
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        orphans = self.cat(report, "outbox_kafka", "topic_without_row")
        self.assertEqual([(o["key"], o["event_id"], o["partition"]) for o in orphans["items"]],
                         [("424242", ce, 2)])
        self.assertEqual(report["missing_ids"], [424242])
        self.assertEqual(report["missing"], 1)
        rc, t = self.trace("010-9999-8888")
        self.assertEqual(rc, 0)
        self.assertEqual(t["applications"], [])
        self.assertTrue(t["scanned"])
        self.assertEqual([(m["topic"], m["ce_id"], m["in_outbox"]) for m in t["topic_matches"]],
                         [(TOPIC, ce, False)])
        # A phone nobody used: nothing anywhere, exit 1.
        rc, t = self.trace("010-5555-0000")
        self.assertEqual(rc, 1)
        self.assertEqual(t["topic_matches"], [])

    def test_event_left_in_the_dlq(self):
        self.healthy(4)
        dead = self.new_application()
        dlq_only = self.new_application()   # in the DLQ topic, its dead_letters row never written
        self.produce(dead, 3)
        self.produce(dlq_only, 3)
        self.record_offsets()
        long_error = "HTTP 500: " + "the sink's answer " * 50   # 910 bytes, under the 999 cap
        dlq_headers = {"dlq_original_topic": TOPIC, "dlq_original_partition": "3",
                       "dlq_consumer_group": self.group, "dlq_attempts": "3",
                       "dlq_error_class": "sink_http", "dlq_error_message": long_error}
        self.produce(dead, 0, topic=DLQ, extra_headers=dlq_headers)
        self.produce(dlq_only, 0, topic=DLQ, extra_headers=dlq_headers)
        a = self.apps[dead]
        self.pg.execute(f"""
            INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition,
                                      src_offset, dlq_partition, dlq_offset, attempts,
                                      error_class, error_message)
            VALUES ('{a['ce_id']}', {dead}, '{TOPIC}', 3, {a['offset']}, 0, 0, 3,
                    'sink_http', 'data platform answered HTTP 500')""")
        self.commit_group()
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        self.assert_only(report, "kafka_consumer", "dead_lettered", [dead, dlq_only])
        _, app, row = self.trace_entry(dead)
        self.assertEqual(app["status"], "dead_lettered")
        self.assertIn("data platform answered HTTP 500", row["story"])
        self.assertEqual(row["dead_letters"][0]["error_class"], "sink_http")
        # the trace's topic scan shows the DLQ headers whole (it cut them at 511 bytes)
        _, t = self.trace(a["phone"], "--scan")
        dead_msgs = [m for m in t["topic_matches"] if m["dlq"] and m["key"] == str(dead)]
        self.assertEqual([m.get("dlq_error_message") for m in dead_msgs], [long_error], t)
        # Replayed and processed: complete again.
        self.pg.execute(f"UPDATE dead_letters SET replayed_at = now() WHERE application_id = {dead}")
        self.process(dead)
        self.process(dlq_only)
        rc, report = self.audit()
        self.assertEqual(rc, 0, json.dumps(report))

    def test_pruned_outbox_row_is_still_checked(self):
        """Issue 11 item 7: an application whose outbox row was pruned was not checked at
        all ("outbox_pruned", complete). Now it needs the consumer's trace: points (with
        effects done) or a dead letter."""
        self.healthy(3)
        self.commit_group()
        lost = self.new_application(age_s=8 * 86400)
        self.pg.execute(f"DELETE FROM outbox WHERE aggregate_id = {lost}")
        rc, report = self.audit()
        self.assertEqual(rc, 1, json.dumps(report))
        self.assert_only(report, "applications_outbox", "pruned_unaccounted", [lost])
        # Dead-lettered (not replayed): in the DLQ, still missing, under that name.
        self.pg.execute(
            "INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition,"
            " src_offset, dlq_partition, dlq_offset, attempts, error_class, error_message)"
            f" VALUES ('{self.apps[lost]['ce_id']}', {lost}, '{TOPIC}', 0, 0, 0, 0, 3,"
            " 'permanent', 'sink said 400')")
        rc, report = self.audit()
        self.assertEqual(rc, 1, json.dumps(report))
        self.assert_only(report, "kafka_consumer", "dead_lettered", [lost])
        # Replayed and processed: accounted for.
        self.pg.execute(f"UPDATE dead_letters SET replayed_at = now() WHERE application_id = {lost}")
        self.processed_without_outbox(lost)
        rc, report = self.audit()
        self.assertEqual(rc, 0, json.dumps(report))
        self.assertEqual(report["verdict"], "complete")

    def test_nothing_consumed_is_never_complete(self):
        """Issue 11 item 7: with no committed offsets (ROLE=api,relay, nothing consumes) the
        audit said "complete: 10 applications, 0 missing" and exited 0."""
        ids = [self.new_application() for _ in range(10)]
        for k, app_id in enumerate(ids):
            self.produce(app_id, k % PARTS)
        self.record_offsets()
        rc, report = self.audit()          # within AUDIT_GRACE (10s): in progress
        self.assertEqual(rc, 1, json.dumps(report))
        self.assertEqual(report["verdict"], "in_progress")
        self.assertEqual(report["missing"], 0)
        self.assertEqual(report["in_flight"], 10)
        rc, lines = self.audit_human()
        self.assertEqual(rc, 1)
        self.assertEqual(lines[-1], "in progress: 10 applications, 0 missing, 10 not through"
                                    " yet (within AUDIT_GRACE)")
        rc, report = self.audit(env={"AUDIT_GRACE": "0s"})   # past the grace: missing
        self.assertEqual(rc, 1, json.dumps(report))
        self.assert_only(report, "kafka_consumer", "not_consumed", ids)
        # Consumed and committed: complete.
        for app_id in ids:
            self.process(app_id)
        self.commit_group()
        rc, report = self.audit(env={"AUDIT_GRACE": "0s"})
        self.assertEqual(rc, 0, json.dumps(report))

    def test_grace_window_and_pending_are_in_progress_not_missing(self):
        self.healthy(4)
        self.commit_group()
        fresh = self.new_application()          # the relay has not run yet: within the grace
        late = self.new_application()           # published after the group's commit: pending
        self.produce(late, 1)
        self.record_offsets()
        rc, report = self.audit()
        self.assertEqual(rc, 1, json.dumps(report))
        self.assertEqual(report["verdict"], "in_progress")
        self.assertEqual(report["missing"], 0)
        self.assertEqual(report["stages"]["outbox_kafka"]["in_grace"], 1)
        self.assertEqual(report["stages"]["kafka_consumer"]["pending"], 1)
        self.assertEqual(report["stages"]["kafka_consumer"]["lag"], 1)
        _, app, _ = self.trace_entry(fresh)
        self.assertEqual(app["status"], "awaiting_relay")
        _, app, _ = self.trace_entry(late)
        self.assertEqual(app["status"], "pending")
        # An hour later, still unpublished: missing.
        self.pg.execute(f"UPDATE outbox SET created_at = now() - interval '1 hour',"
                        f" attempts = 4, last_error = 'broker down' WHERE aggregate_id = {fresh}")
        rc, report = self.audit()
        self.assertEqual(rc, 1)
        self.assert_only(report, "outbox_kafka", "unpublished", [fresh])
        _, app, row = self.trace_entry(fresh)
        self.assertEqual(app["status"], "unpublished")
        self.assertIn("broker down", row["story"])

    def overflow_partition_0(self):
        """Eight events published to partition 0 at offsets 0..7, the first ones deleted by
        the mock's retention (5 MiB per partition: seven ~900 KB events push the first
        out). Returns (the eight ids in offset order, the log start)."""
        first = self.new_application()
        self.produce(first, 0)
        ids = [first]
        for _ in range(7):
            app_id = self.new_application()
            padded = json.loads(self.apps[app_id]["payload"])
            padded["padding"] = "x" * 900_000
            self.produce(app_id, 0, value=json.dumps(padded))
            ids.append(app_id)
        low = min(m["offset"] for m in kcat_consume(self.km.brokers, TOPIC, partition=0))
        self.assertGreater(low, 0, "the mock did not delete the oldest message")
        for offset, app_id in enumerate(ids):
            self.pg.execute(record_sql(f"aggregate_id = {app_id}", 0, offset))
        return ids, low

    def test_expired_from_the_topic_is_not_missing(self):
        ids, low = self.overflow_partition_0()
        first = ids[0]
        for app_id in ids:
            self.process(app_id)
        self.commit_group()
        rc, report = self.audit()
        self.assertEqual(rc, 0, json.dumps(report)[:3000])
        expired = self.cat(report, "outbox_kafka", "expired")
        self.assertIn(first, [i["application_id"] for i in expired["items"]])
        self.assertEqual(expired["count"], low)
        self.assertEqual(report["stages"]["outbox_kafka"]["verified"], 8 - low)
        _, app, row = self.trace_entry(first)
        self.assertEqual(app["status"], "processed")
        self.assertTrue(row["topic_record"]["expired"])

    def test_expired_before_it_was_consumed_is_missing(self):
        """Issue 11 item 7: an event deleted from the topic before the group consumed it
        was counted "expired" (and pending), never missing."""
        ids, low = self.overflow_partition_0()
        # The consumer handled the ones still in the topic; the expired ones, never. No
        # offset was committed (the group's commit had not happened yet).
        for app_id in ids[low:]:
            self.process(app_id)
        expired_ids = ids[:low]
        rc, report = self.audit()
        self.assertEqual(rc, 1, json.dumps(report)[:3000])
        self.assert_only(report, "outbox_kafka", "expired_unconsumed", expired_ids)

    def test_event_filter(self):
        self.healthy(4, show="show-a")
        b = self.healthy(4, show="show-b")
        self.commit_group()
        self.pg.execute(f"DELETE FROM processed_events WHERE event_id = '{self.apps[b[1]]['ce_id']}'")
        rc, report = self.audit("--event-id", "show-a")
        self.assertEqual(rc, 0, json.dumps(report))
        self.assertEqual(report["applications"], 4)
        self.assertEqual(report["stages"]["outbox_kafka"]["topic_without_row"]["count"], 0)
        rc, report = self.audit("--event-id", "show-b")
        self.assertEqual(rc, 1)
        self.assert_only(report, "kafka_consumer", "unhandled", [b[1]])
        rc, report = self.audit("--since", "2000-01-01T00:00:00Z")
        self.assertEqual((rc, report["applications"]), (1, 8))

    def test_errors_exit_2(self):
        r = run_ticketd(["audit"], env=dict(self.env, KAFKA_BROKERS=""))
        self.assertEqual(r.returncode, 2)
        self.assertIn("kafka-mock", r.stderr)
        r = run_ticketd(["audit"], env=dict(self.env, DATABASE_URL="host=/nonexistent dbname=x"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("database unreachable", r.stderr)
        r = run_ticketd(["audit", "--since", "not a time"], env=self.env)
        self.assertEqual(r.returncode, 2)
        r = run_ticketd(["trace", "--phone", "12345"], env=self.env)
        self.assertEqual(r.returncode, 2)

    def test_admin_endpoints(self):
        ids = self.healthy(5)
        self.commit_group()
        lost = ids[1]
        self.pg.execute(f"DELETE FROM processed_events WHERE event_id = '{self.apps[lost]['ce_id']}'")
        svc = self.track(Ticketd(self.pg, brokers=self.km.brokers, role="api",
                                 env={"CONSUMER_GROUP": self.group}))
        for token in (None, "wrong-token"):
            self.assertEqual(svc.admin("GET", "/admin/audit", token=token).status, 401)
            self.assertEqual(svc.admin("GET", "/admin/trace?phone=010-0000-0001",
                                       token=token).status, 401)
        r = svc.admin("GET", "/admin/audit")
        self.assertEqual(r.status, 200, r.body)
        body = r.json()
        _, cli = self.audit()
        self.assertEqual(body["missing_ids"], [lost])
        self.assertEqual(body["missing_ids"], cli["missing_ids"])
        self.assertEqual(body["stages"]["kafka_consumer"]["unhandled"],
                         cli["stages"]["kafka_consumer"]["unhandled"])
        r = svc.admin("GET", f"/admin/audit?event_id={SHOW}")
        self.assertEqual((r.status, r.json()["missing"]), (200, 1))
        self.assertEqual(svc.admin("GET", "/admin/audit?event_id=bad%20id").status, 400)
        r = svc.admin("GET", f"/admin/trace?phone={self.apps[lost]['phone']}")
        self.assertEqual(r.status, 200, r.body)
        t = r.json()
        self.assertEqual([a["status"] for a in t["applications"]], ["lost"])
        self.assertEqual(svc.admin("GET", "/admin/trace").status, 400)
        self.assertEqual(svc.admin("GET", "/admin/trace?phone=12").status, 400)
        # The service logged no full phone number while tracing.
        self.assertNotIn(self.apps[lost]["phone"], svc.log_text())
        # A failed report's error is quoted in the log: PostgreSQL echoes a bad since= with
        # its quotes, which written raw between quotes forged a logfmt key.
        self.assertNotEqual(svc.admin("GET", "/admin/audit?since=x%22%20event%3Dforged").status, 200)
        line = wait_until(lambda: next((ln for ln in svc.log_text().splitlines()
                                        if "audit_failed" in ln), None),
                          timeout=30, what="the audit_failed log line")
        keys = re.findall(r'(?:^|\s)([A-Za-z_][\w.]*)=(?:"(?:[^"\\]|\\.)*"|\S*)', line)
        self.assertEqual(keys.count("event"), 1, line)

    def test_one_status_rule_for_public_admin_and_trace(self):
        """Issue 13: an application processed (all effects done) whose event also has a dead
        letter not replayed has one status wherever it is read. Before, the public status and
        the admin record said dead_lettered and the trace said processed."""
        app_id = self.healthy(1)[0]
        self.commit_group()
        ce = self.apps[app_id]["ce_id"]
        self.pg.execute(f"""
            INSERT INTO dead_letters (event_id, application_id, src_topic, src_partition,
                                      src_offset, dlq_partition, dlq_offset, attempts,
                                      error_class, error_message)
            VALUES ('{ce}', {app_id}, '{TOPIC}', 0, 0, 0, 0, 3, 'http_5xx', 'test')""")
        ref = self.pg.query(f"SELECT reference FROM applications WHERE id = {app_id}")[0][0]
        svc = self.track(Ticketd(self.pg, brokers=self.km.brokers, role="api",
                                 env={"CONSUMER_GROUP": self.group}))
        r = svc.request("GET", f"/v1/applications/{ref}")
        self.assertEqual(r.status, 200, r.body)
        public = r.json()["status"]
        r = svc.admin("GET", f"/admin/applications/{app_id}")
        self.assertEqual(r.status, 200, r.body)
        record = r.json()["status"]
        r = svc.admin("GET", f"/admin/trace?phone={self.apps[app_id]['phone']}")
        self.assertEqual(r.status, 200, r.body)
        traced = [a["status"] for a in r.json()["applications"]]
        _, _, row = self.trace_entry(app_id)
        self.assertEqual((public, record, traced, row["status"]),
                         ("dead_lettered", "dead_lettered", ["dead_lettered"], "dead_lettered"))
        # Once replayed, it is processed everywhere.
        self.pg.execute(f"UPDATE dead_letters SET replayed_at = now() WHERE event_id = '{ce}'")
        statuses = (svc.request("GET", f"/v1/applications/{ref}").json()["status"],
                    svc.admin("GET", f"/admin/applications/{app_id}").json()["status"],
                    [a["status"] for a in svc.admin(
                        "GET", f"/admin/trace?phone={self.apps[app_id]['phone']}").json()
                     ["applications"]])
        self.assertEqual(statuses, ("processed", "processed", ["processed"]))


if __name__ == "__main__":
    unittest.main()
