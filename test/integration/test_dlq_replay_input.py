"""Issue 12, item 4: POST /admin/dlq/replay says what it does.

On main `{"event_id": null}`, a misspelled key (`{"eventid": ...}`), a wrong type or an empty
body all replayed every dead letter. Now replay-all needs `{"all": true}`, one event needs
`{"event_id": "<uuid>"}`, and anything else is a 400 naming the field that replays nothing.
A dead letter is put on the DLQ topic with kcat (ROLE=api: no consumer takes the replayed
copy), and the source topic and dead_letters are read back after every request."""
import json
import unittest
import uuid

import harness
from harness import KafkaMock, Ticketd, TicketdTestCase, kcat_consume, kcat_produce

TOPIC = "ticket-applied"
DLQ = "ticket-applied.DLQ"


class DlqReplayInputTest(TicketdTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.kafka = KafkaMock(partitions=1)
        cls.td = Ticketd(cls.pg, cls.kafka.brokers, role="api")
        cls.event_id = str(uuid.uuid4())
        payload = {"id": 1, "event_id": "replay-2026", "phone": "01012345678", "name": "X",
                   "email": None, "seats": 1, "created_at": "2026-12-01T00:00:00.000000Z"}
        kcat_produce(cls.kafka.brokers, DLQ, json.dumps(payload), key="1", partition=0, headers={
            "ce_specversion": "1.0", "ce_id": cls.event_id, "ce_source": "/ticketd",
            "ce_type": "TicketApplied", "content-type": "application/json",
            "dlq_original_topic": TOPIC, "dlq_original_partition": "0",
            "dlq_original_offset": "0", "dlq_attempts": "3", "dlq_error_class": "sink_status",
            "dlq_error_message": "500"})
        kcat_consume(cls.kafka.brokers, DLQ, expect=1)

    @classmethod
    def tearDownClass(cls):
        cls.td.close()
        cls.kafka.close()
        super().tearDownClass()

    def replayed_nothing(self):
        self.assertEqual(self.pg.count("dead_letters WHERE replayed_at IS NOT NULL"), 0)
        self.assertEqual(kcat_consume(self.kafka.brokers, TOPIC), [])

    def test_1_ambiguous_bodies_are_400_and_replay_nothing(self):
        other = str(uuid.uuid4())
        cases = [
            (None, "body"), ("", "body"), ("  \n", "body"), ("{}", "body"), ("null", "body"),
            ("[]", "body"), ('"all"', "body"), ("{", "body"),
            ('{"all": true} trailing', "body"),
            ('{"event_id": null}', "event_id"), ('{"event_id": 42}', "event_id"),
            ('{"event_id": "not-a-uuid"}', "event_id"), ('{"event_id": ["%s"]}' % other, "event_id"),
            ('{"all": false}', "all"), ('{"all": "true"}', "all"), ('{"all": 1}', "all"),
            ('{"all": null}', "all"),
            ('{"eventid": "%s"}' % self.event_id, "eventid"), ('{"All": true}', "All"),
            ('{"all": true, "force": true}', "force"),
            ('{"all": true, "event_id": "%s"}' % self.event_id, "body"),
        ]
        for body, field in cases:
            h = {"Authorization": f"Bearer {harness.ADMIN_TOKEN}", "Content-Type": "application/json"}
            r = self.td.request("POST", "/admin/dlq/replay", body=body, headers=h)
            self.assertEqual(r.status, 400, f"{body!r}: {r.status} {r.body}")
            got = r.json()
            self.assertEqual(got["error"], "bad_request", body)
            self.assertEqual(got["field"], field, f"{body!r}: {got}")
            self.assertTrue(got["message"], body)
        self.replayed_nothing()
        # an event that is not in the DLQ: 200, nothing replayed
        r = self.td.admin("POST", "/admin/dlq/replay", json={"event_id": other})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["replayed"], 0)
        self.replayed_nothing()

    def test_2_all_true_replays_everything(self):
        r = self.td.admin("POST", "/admin/dlq/replay", json={"all": True})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"replayed": 1, "skipped": 0, "failed": 0})
        msgs = kcat_consume(self.kafka.brokers, TOPIC, expect=1)
        self.assertEqual([m["headers"].get("ce_id") for m in msgs], [self.event_id])
        self.assertEqual(self.pg.count(
            f"dead_letters WHERE event_id = '{self.event_id}' AND replayed_at IS NOT NULL"), 1)


if __name__ == "__main__":
    unittest.main()
