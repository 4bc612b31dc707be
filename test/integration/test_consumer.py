"""Consumer (issue 4): idempotent effects, retries, dead letters, replay, rebalances.

Every test runs ticketd against a real PostgreSQL and `ticketd kafka-mock`, with a fake
data-platform sink (fake_sink.py) and a fake SMTP server (fake_smtp.py) that can be told to
fail, and checks what was written: rows via psql, topics via kcat, requests the sink and the
SMTP server received. Each test uses its own mock cluster and consumer group.
"""
import json
import os
import signal
import sys
import time
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from consumer_case import SHORT_SESSION, ConsumerTestCase  # noqa: E402
from fake_smtp import FakeSmtp  # noqa: E402

TOPIC = "ticket-applied"
DLQ = "ticket-applied.DLQ"
PARTITIONS = ConsumerTestCase.PARTITIONS


class ConsumerTest(ConsumerTestCase):
    GROUP_PREFIX = "consumer"
    START_ENV = SHORT_SESSION

    # ---------------------------------------------------------------- helpers

    def event(self, app_id):
        """The outbox row of an application once published: event_id, partition, offset, payload."""
        def published():
            rows = self.pg.query(
                "SELECT event_id, kafka_partition, kafka_offset, payload::text FROM outbox_status"
                f" WHERE aggregate_id = {int(app_id)} AND published_at IS NOT NULL")
            return rows[0] if rows else None
        ev, part, off, payload = h.wait_until(published, timeout=30, what=f"app {app_id} published")
        return {"event_id": ev, "partition": int(part), "offset": int(off),
                "payload": json.loads(payload)}

    def status(self, td, app_id):
        r = td.admin("GET", f"/admin/applications/{app_id}")
        self.assertEqual(r.status, 200, r)
        return r.json()

    def wait_status(self, td, app_id, want, timeout=40):
        return h.wait_until(lambda: self.status(td, app_id)["status"] == want and self.status(td, app_id),
                            timeout=timeout, what=f"application {app_id} {want}")

    def points_of(self, event_id):
        return self.pg.count(f"points_ledger WHERE event_id = '{event_id}'")

    def all_processed(self, n):
        """n events in processed_events and no effect left undone."""
        return (self.pg.count("processed_events") == n
                and self.pg.count("event_effects WHERE NOT done") == 0)

    def dead_letter_by_sink(self, td, i):
        """Makes one application fail at the sink until dead-lettered; returns (app id, event)."""
        phone_digits = h.phone_for(i).replace("-", "")
        self.sink.fail_matching(phone_digits)
        app_id = self.apply(td, i)
        self.wait_status(td, app_id, "dead_lettered")
        return app_id, self.event(app_id)

    # ---------------------------------------------------------------- tests

    def test_seed_incident_dead_letter_then_replay(self):
        td = self.start()
        self.wait_assigned(td)
        others = [self.apply(td, i) for i in (1, 2)]
        victim, ev = self.dead_letter_by_sink(td, 3)
        for a in others:
            self.wait_status(td, a, "processed")

        # three attempts reached the sink, each answered 500; nothing else for this event
        tries = [r for r in self.sink.received() if r["key"] == ev["event_id"]]
        self.assertEqual([r["status"] for r in tries], [500, 500, 500])
        self.assertEqual(tries[0]["body"]["id"], ev["event_id"])
        self.assertEqual(tries[0]["body"]["type"], "TicketApplied")
        self.assertEqual(tries[0]["body"]["data"], ev["payload"])

        # in the DLQ (read by kcat), with the original key, value and headers + where/why
        dlq = h.kcat_consume(self.kafka.brokers, DLQ, expect=1)
        self.assertEqual(len(dlq), 1, dlq)
        m = dlq[0]
        hd = m["headers"]
        self.assertEqual(m["key"], str(victim))
        self.assertEqual(json.loads(m["value"]), ev["payload"])
        self.assertEqual(hd["ce_id"], ev["event_id"])
        self.assertEqual(hd["ce_type"], "TicketApplied")
        self.assertEqual(hd["dlq_original_topic"], TOPIC)
        self.assertEqual(int(hd["dlq_original_partition"]), ev["partition"])
        self.assertEqual(int(hd["dlq_original_offset"]), ev["offset"])
        self.assertGreater(int(hd["dlq_original_timestamp"]), 0)
        self.assertEqual(hd["dlq_consumer_group"], self.group)
        self.assertEqual(hd["dlq_attempts"], "3")
        self.assertEqual(hd["dlq_error_class"], "sink_status")
        self.assertIn("HTTP 500", hd["dlq_error_message"])
        row = self.pg.query(f"SELECT attempts, error_class, dlq_partition, dlq_offset, replayed_at"
                            f" FROM dead_letters WHERE event_id = '{ev['event_id']}'")
        self.assertEqual(row, [["3", "sink_status", str(m["partition"]), str(m["offset"]), None]])

        # the application shows it; points were granted once already (points come first)
        st = self.status(td, victim)
        self.assertEqual(st["status"], "dead_lettered")
        self.assertEqual(self.points_of(ev["event_id"]), 1)
        listed = td.admin("GET", "/admin/dlq").json()
        self.assertEqual(listed["count"], 1)
        self.assertEqual(listed["dead_letters"][0]["event_id"], ev["event_id"])
        self.assertFalse(listed["dead_letters"][0]["replayed"])
        self.assertEqual(listed["dead_letters"][0]["error_class"], "sink_status")

        # the sink is fixed; replay
        self.sink.ok()
        r = td.admin("POST", "/admin/dlq/replay", json={"all": True})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"replayed": 1, "skipped": 0, "failed": 0})
        self.wait_status(td, victim, "processed")
        self.assertEqual(self.points_of(ev["event_id"]), 1)
        ok = [r for r in self.sink.received() if r["key"] == ev["event_id"] and r["status"] == 200]
        self.assertEqual(len(ok), 1)
        self.assertIsNotNone(self.pg.scalar(
            f"SELECT replayed_at FROM dead_letters WHERE event_id = '{ev['event_id']}'"))
        self.assertTrue(td.admin("GET", "/admin/dlq").json()["dead_letters"][0]["replayed"])
        # a second replay does nothing
        self.assertEqual(td.admin("POST", "/admin/dlq/replay", json={"all": True}).json(),
                         {"replayed": 0, "skipped": 1, "failed": 0})
        self.assertEqual(self.pg.count("points_ledger"), 3)
        self.assertEqual(self.pg.count("processed_events"), 3)

    def test_sink_outage_loses_nothing_doubles_nothing_keeps_order(self):
        td = self.start(env={"RETRY_MAX_ATTEMPTS": "30"})
        self.wait_assigned(td)
        self.sink.fail_all(500)
        n = 24
        ids = [self.apply(td, 100 + i) for i in range(n)]
        h.wait_until(lambda: len(self.sink.received()) >= 8, timeout=30, what="failed deliveries")
        time.sleep(2.0)  # a few seconds of outage
        self.sink.ok()
        h.wait_until(lambda: self.all_processed(n), timeout=60, what="all processed")

        events = {self.event(a)["event_id"]: self.event(a) for a in ids}
        self.assertEqual(self.pg.count("dead_letters"), 0)
        self.assertEqual(self.pg.count("points_ledger"), n)
        self.assertEqual(int(self.pg.scalar("SELECT count(DISTINCT event_id) FROM points_ledger")), n)
        got = self.sink.received()
        self.assertTrue(any(r["status"] == 500 for r in got))
        for ev_id in events:
            self.assertEqual(len([r for r in got if r["key"] == ev_id and r["status"] == 200]), 1,
                             f"{ev_id} delivered once with 200")
        # per partition, the sink saw events in offset order (retries included)
        for p in range(PARTITIONS):
            offs = [events[r["key"]]["offset"] for r in got if events[r["key"]]["partition"] == p]
            self.assertEqual(offs, sorted(offs), f"partition {p} order")
        self.assertGreater(td.metrics().get("ticketd_consumer_retries_total", 0), 0)

    def test_smtp_refusing_retries_email_only(self):
        smtp = FakeSmtp()
        self.addCleanup(smtp.close)
        smtp.refuse()
        td = self.start(smtp=smtp, env={"RETRY_MAX_ATTEMPTS": "30"})
        self.wait_assigned(td)
        n = 6
        emails = {}
        ids = []
        for i in range(n):
            email = f"applicant{i}@example.com" if i % 3 != 0 else None
            a = self.apply(td, 200 + i, email=email)
            ids.append(a)
            emails[a] = email
        h.wait_until(lambda: smtp.refused_count() >= 6, timeout=30, what="refused e-mails")
        smtp.accept()
        h.wait_until(lambda: self.all_processed(n), timeout=60, what="all processed")

        self.assertEqual(self.pg.count("dead_letters"), 0)
        self.assertEqual(self.pg.count("points_ledger"), n)
        got = self.sink.received()
        self.assertEqual(len(got), n, "the sink got each event once, never re-posted")
        self.assertTrue(all(r["status"] == 200 for r in got))
        msgs = smtp.messages()
        with_email = [a for a in ids if emails[a]]
        self.assertEqual(len(msgs), len(with_email), "one e-mail per applicant with an address")
        for a in with_email:
            ev = self.event(a)
            mine = [m for m in msgs if m["message_id"] == f"<{ev['event_id']}@ticketd>"]
            self.assertEqual(len(mine), 1)
            self.assertEqual(mine[0]["to"], [emails[a]])
        self.assertGreater(int(self.pg.scalar(
            "SELECT max(attempts) FROM event_effects WHERE effect = 'email'")), 1)
        self.assertEqual(self.pg.count("event_effects WHERE effect = 'data_platform' AND attempts <> 1"), 0)
        self.assertEqual(self.pg.count("event_effects WHERE effect = 'email'"), len(with_email))

    def test_crash_after_sink_delivery_before_commit(self):
        td = self.start()
        self.wait_assigned(td)
        self.sink.hold()  # the sink records the POST and keeps its reply back
        app_id = self.apply(td, 300)
        ev = self.event(app_id)
        self.sink.wait_for(1, timeout=30)
        h.wait_until(lambda: self.points_of(ev["event_id"]) == 1, timeout=10, what="points")
        td.kill()  # SIGKILL: the sink has the event, the offset is not committed
        self.sink.ok()

        td2 = self.start(name="ticketd-2")
        self.wait_status(td2, app_id, "processed", timeout=60)
        self.assertEqual(self.points_of(ev["event_id"]), 1)
        self.assertEqual(self.pg.count("processed_events"), 1)
        got = [r for r in self.sink.received() if r["key"] == ev["event_id"]]
        self.assertEqual(len(got), 2, "re-delivered and posted again under the same key")
        self.assertEqual(got[0]["body"], got[1]["body"])

    def test_failing_event_holds_its_partition_in_a_window(self):
        """Events are handed out in windows and their points run ahead, but a failing event
        holds back the later sink calls of its partition (order) and the committed offset
        (a crash re-delivers it), while other partitions flow."""
        # 100 attempts 500 ms apart: the victim is still failing long after the checks below
        td = self.start(env={"RETRY_MAX_ATTEMPTS": "100", "RETRY_BACKOFF": "500ms"})
        self.wait_assigned(td)
        self.sink.fail_matching(h.phone_for(800).replace("-", ""))
        victim = self.apply(td, 800)
        vev = self.event(victim)
        others = [self.apply(td, 801 + i) for i in range(24)]
        evs = {a: self.event(a) for a in others}
        behind = [a for a in others if evs[a]["partition"] == vev["partition"]]
        elsewhere = [a for a in others if evs[a]["partition"] != vev["partition"]]
        self.assertTrue(behind and elsewhere, "events on the victim's partition and on others")
        for a in elsewhere:
            self.wait_status(td, a, "processed")
        # later events of the victim's partition got their points (the window) but no sink call
        h.wait_until(lambda: all(self.points_of(evs[a]["event_id"]) == 1 for a in behind),
                     timeout=20, what="points of the events behind the failing one")
        h.wait_until(lambda: len([r for r in self.sink.received()
                                  if r["key"] == vev["event_id"]]) >= 3,
                     timeout=30, what="the failing event retried")
        time.sleep(0.6)  # commits run every 200 ms: give a wrong one the chance to happen
        keys = {r["key"] for r in self.sink.received()}
        self.assertFalse(keys & {evs[a]["event_id"] for a in behind},
                         "a sink call overtook the failing event of its partition")
        self.assertEqual(self.status(td, victim)["status"], "published")
        td.kill()  # SIGKILL: only committed offsets survive
        self.sink.ok()

        td2 = self.start(name="ticketd-2")
        self.wait_status(td2, victim, "processed", timeout=60)
        for a in behind:
            self.wait_status(td2, a, "processed")
        self.assertEqual(self.pg.count("dead_letters"), 0)
        self.assertEqual(self.pg.count("points_ledger"), 1 + len(others))
        got = self.sink.received()
        order = [r["key"] for r in got if r["status"] == 200 and
                 r["key"] in {vev["event_id"]} | {evs[a]["event_id"] for a in behind}]
        want = sorted([vev] + [evs[a] for a in behind], key=lambda e: e["offset"])
        self.assertEqual(order, [e["event_id"] for e in want], "delivered once each, in offset order")

    def test_graceful_stop_with_an_effect_in_flight(self):
        td = self.start(env={"SHUTDOWN_GRACE": "2s"})
        self.wait_assigned(td)
        self.sink.hold()
        app_id = self.apply(td, 350)
        ev = self.event(app_id)
        self.sink.wait_for(1, timeout=30)
        # SIGTERM while the sink keeps its reply back: the bounded wait runs out, the request
        # is abandoned, nothing is committed for the event, and the process exits cleanly
        self.assertEqual(td.terminate(timeout=40), 0)
        self.assertIn("event=closed", td.log_text())
        self.assertEqual(self.pg.count("event_effects WHERE effect = 'data_platform' AND done"), 0)
        self.sink.ok()
        td2 = self.start(name="ticketd-2")
        self.wait_status(td2, app_id, "processed", timeout=60)
        self.assertEqual(self.points_of(ev["event_id"]), 1)

    def test_two_consumers_one_killed_mid_batch(self):
        api = self.start(name="ticketd-api", role="api,relay")
        b = self.start(name="consumer-b", role="consumer")
        # role consumer only: /readyz waits for the group join, so once c is ready the
        # rebalance that split the partitions between b and c is done
        c = self.start(name="consumer-c", role="consumer")
        self.sink.hold()
        n = 30
        ids = [self.apply(api, 400 + i) for i in range(n)]
        # every partition has an event in flight (one per partition): both consumers are busy
        h.wait_until(lambda: len({r["key"] for r in self.sink.received()}) >= PARTITIONS,
                     timeout=30, what="events in flight on every partition")
        b.kill()
        self.sink.ok()
        h.wait_until(lambda: self.all_processed(n), timeout=90, what="all processed by consumer c")
        self.assertEqual(self.pg.count("points_ledger"), n)
        self.assertEqual(int(self.pg.scalar("SELECT count(DISTINCT event_id) FROM points_ledger")), n)
        self.assertEqual(self.pg.count("dead_letters"), 0)
        got = self.sink.received()
        for a in ids:
            ev = self.event(a)
            self.assertGreaterEqual(len([r for r in got if r["key"] == ev["event_id"] and r["status"] == 200]), 1)
        self.assertIn("partitions=0,1,2,3", c.log_text(), "c took over every partition")

    def test_poison_message_dead_lettered_at_once(self):
        td = self.start()
        self.wait_assigned(td)
        poison_id = str(uuid.uuid4())
        h.kcat_produce(self.kafka.brokers, TOPIC, "this is not an application {", key="poison",
                       partition=0, headers={"ce_id": poison_id, "ce_type": "TicketApplied"})
        dlq = h.kcat_consume(self.kafka.brokers, DLQ, expect=1)
        hd = dlq[0]["headers"]
        self.assertEqual(dlq[0]["value"], "this is not an application {")
        self.assertEqual(dlq[0]["key"], "poison")
        self.assertEqual(hd["dlq_error_class"], "unparseable")
        self.assertEqual(hd["dlq_attempts"], "1")
        self.assertEqual(hd["dlq_original_partition"], "0")
        self.assertEqual(hd["dlq_original_offset"], "0")
        h.wait_until(lambda: self.pg.count(f"dead_letters WHERE event_id = '{poison_id}'") == 1,
                     timeout=10, what="dead_letters row")
        self.assertEqual(self.sink.received(), [])
        # the partition moves on: later events on partition 0 are handled
        on_p0 = []
        for i in range(40):
            a = self.apply(td, 500 + i)
            if self.event(a)["partition"] == 0:
                on_p0.append(a)
            if len(on_p0) >= 2:
                break
        self.assertTrue(on_p0, "some application landed on partition 0")
        for a in on_p0:
            self.wait_status(td, a, "processed")
        self.assertEqual(td.metrics().get("ticketd_consumer_retries_total", 0), 0)
        # the CLI lists it; replay skips it (handling it again cannot succeed)
        env = {"DATABASE_URL": self.pg.url, "KAFKA_BROKERS": self.kafka.brokers}
        r = h.run_ticketd(["dlq", "list"], env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        listed = json.loads(r.stdout)
        self.assertEqual(listed["count"], 1)
        self.assertEqual(listed["dead_letters"][0]["event_id"], poison_id)
        r = h.run_ticketd(["dlq", "replay"], env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"replayed": 0, "skipped": 1, "failed": 0})

    def test_offset_out_of_range_is_reported_and_counted(self):
        td = self.start()
        self.wait_assigned(td)
        app_id = self.apply(td, 600)
        ev = self.event(app_id)
        self.wait_status(td, app_id, "processed")
        time.sleep(0.5)  # the commit (every 200 ms) and the graceful close commit
        self.assertEqual(td.terminate(), 0)
        p = ev["partition"]
        # push the log start of that partition past the committed offset: the mock keeps at
        # most 5 MiB per partition and deletes older data silently
        big = "x" * 700_000
        for _ in range(10):
            h.kcat_produce(self.kafka.brokers, TOPIC, big, key="filler", partition=p)
        td2 = self.start(name="ticketd-2")
        key = f'ticketd_consumer_offset_out_of_range_total{{partition="{p}"}}'
        h.wait_until(lambda: td2.metrics().get(key, 0) >= 1, timeout=60,
                     what="out-of-range counted")
        self.assertIn("event=offset_out_of_range", td2.log_text())
        self.assertIn("level=error", [l for l in td2.log_text().splitlines()
                                      if "offset_out_of_range" in l][0])
        # it goes on from the log start: the fillers left are handled (poison -> DLQ)
        h.wait_until(lambda: self.pg.count("dead_letters WHERE error_class = 'unparseable'") >= 1,
                     timeout=60, what="consumption resumed at the log start")

    def test_admin_endpoints_need_the_token(self):
        td = self.start()
        self.wait_assigned(td)
        app_id, ev = self.dead_letter_by_sink(td, 700)
        self.sink.ok()
        before = len(h.kcat_consume(self.kafka.brokers, TOPIC, expect=1))
        for token in (None, "wrong-token"):
            self.assertEqual(td.admin("GET", "/admin/dlq", token=token).status, 401)
            self.assertEqual(td.admin("POST", "/admin/dlq/replay", json={}, token=token).status, 401)
            self.assertEqual(td.admin("POST", "/admin/dlq/replay", json={"event_id": ev["event_id"]},
                                      token=token).status, 401)
        time.sleep(1.0)
        self.assertIsNone(self.pg.scalar(f"SELECT replayed_at FROM dead_letters WHERE event_id = '{ev['event_id']}'"))
        self.assertEqual(len(h.kcat_consume(self.kafka.brokers, TOPIC)), before)
        self.assertEqual(self.status(td, app_id)["status"], "dead_lettered")
        # with the token, replay by event id works (so the checks above could fail)
        r = td.admin("POST", "/admin/dlq/replay", json={"event_id": ev["event_id"]})
        self.assertEqual(r.json(), {"replayed": 1, "skipped": 0, "failed": 0})
        self.assertEqual(len(h.kcat_consume(self.kafka.brokers, TOPIC, expect=before + 1)), before + 1)
        self.wait_status(td, app_id, "processed")
        self.assertEqual(td.admin("POST", "/admin/dlq/replay", json={"event_id": "nope"}).status, 400)


if __name__ == "__main__":
    unittest.main()
