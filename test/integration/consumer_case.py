"""The set-up of the tests that run ticketd's consumer: a fresh database, their own
`ticketd kafka-mock` and consumer group, the fake data-platform sink, and ticketd started
with short retries. Used by test_consumer.py, test_consumer_faults.py and test_report.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from fake_sink import FakeSink  # noqa: E402

# short retries and waits, so a failing effect is retried (or dead-lettered) within a test
CONSUMER_ENV = {"RETRY_BACKOFF": "200ms", "RETRY_MAX_ATTEMPTS": "3", "SINK_TIMEOUT": "10s",
                "RELAY_INTERVAL": "200ms", "SHUTDOWN_GRACE": "5s"}
# the mock ignores LeaveGroup: a replacement member waits one session timeout, so keep it short
SHORT_SESSION = {"KAFKA_CONFIG": "session.timeout.ms=6000,heartbeat.interval.ms=500"}


class ConsumerTestCase(h.TicketdTestCase):
    PARTITIONS = 4
    GROUP_PREFIX = "consumer"
    START_ENV = {}   # a test class's own settings on top of CONSUMER_ENV

    def setUp(self):
        self.reset_db()
        self.kafka = self.track(h.KafkaMock(self.PARTITIONS))
        self.sink = FakeSink()
        self.addCleanup(self.sink.close)
        self.group = h.unique_group(self.GROUP_PREFIX)

    def start(self, name="ticketd", role=None, smtp=None, env=None, ready=True):
        e = {"DATA_PLATFORM_URL": self.sink.url, "CONSUMER_GROUP": self.group,
             **CONSUMER_ENV, **self.START_ENV}
        if smtp is not None:
            e["SMTP_URL"] = smtp.url
            e["SMTP_ALLOW_CLEARTEXT"] = "true"  # the fake SMTP server has no TLS
        e.update(env or {})
        return self.track(h.Ticketd(self.pg, self.kafka.brokers, env=e, role=role, name=name,
                                    ready=ready))

    def wait_assigned(self, td, timeout=60):
        h.wait_until(lambda: "event=assigned" in td.log_text(), timeout=timeout,
                     what=f"{td.name} joined its consumer group")

    def apply(self, td, i, email=None):
        """Applies as applicant i; the application's id."""
        r = td.apply(phone=h.phone_for(i), name=f"Applicant {i}", email=email)
        self.assertEqual(r.status, 201, r)
        return self.pg.application_id(r.json())
