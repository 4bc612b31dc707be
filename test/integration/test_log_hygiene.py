"""No secret and no full phone number in any log line.

A service runs at LOG_LEVEL=debug with distinctive secrets: ADMIN_TOKEN, a password in
DATABASE_URL (trust auth ignores it, but the URL carries it), SASL credentials in
KAFKA_CONFIG (inert with the plaintext mock cluster) and SMTP credentials in SMTP_URL.
It takes applications with distinctive phones and goes through error paths: bad bodies
(some with a malformed phone), duplicates, lookups by phone, admin calls with a wrong
token, a PostgreSQL outage. The CLI commands run with the same environment. Then every
line printed is searched for the secrets and for any full phone number, digits or dashed;
the masked form (010-****-5678) may appear.
"""
import os
import re
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ADMIN_SECRET = "AdmTok-Zq81xWv3Lk"
DB_PASSWORD = "S3cretPw-Hq47Tz"
KAFKA_USER = "kuser-Rm52Yb"
KAFKA_PASSWORD = "KafkaPw-Jc93Nd"
SMTP_PASSWORD = "SmtpPw-Fx28Gu"
WRONG_TOKEN = "WrongTok-Pe61Qa"
SECRETS = [ADMIN_SECRET, DB_PASSWORD, KAFKA_PASSWORD, SMTP_PASSWORD, WRONG_TOKEN]
# Distinctive phones: the middle blocks appear nowhere else in a log.
PHONES = ["010-7391-4826", "011-5834-2947", "016-8264-1739", "019-4718-6352", "010-6029-8173"]
BAD_PHONE = "010-9438-27165"  # one digit too many: a 400 that must not echo it

# A full Korean mobile number anywhere in a line: 01X, then 3-4 and 4 digits, with or
# without dashes or spaces, not part of a longer digit run.
PHONE_RE = re.compile(r"(?<![0-9])01[016789][- .]?[0-9]{3,4}[- .]?[0-9]{4}(?![0-9])")


def phone_leaks(line):
    """Full phone numbers in line (masked ones like 010-****-5678 do not match)."""
    return PHONE_RE.findall(line)


def phone_fragments(phone):
    """Unmasked pieces that would identify one of our phones."""
    digits = phone.replace("-", "")
    middle, last = phone.split("-")[1], phone.split("-")[2]
    return [digits, digits[3:], f"{middle}-{last}", f"{middle}{last}", phone]


class Scanner(unittest.TestCase):
    """The scanner itself finds what it must (so the real test can fail)."""

    def test_scanner(self):
        for line in ["phone=010-7391-4826", "p=01073914826 x", "011 583 2947", "{\"phone\":\"0167264173\"}"]:
            self.assertTrue(phone_leaks(line), line)
        for line in ["phone=010-****-4826", "id=1201073914826123", "ts=2026-11-26T19:40:00.123Z",
                     "offset=0101234", "event_id=7f0e8d1c-0100-4a2b-9c3d-0123456789ab"]:
            self.assertFalse(phone_leaks(line), line)


class LogHygiene(harness.TicketdTestCase):

    def env(self):
        pg = self.pg
        return {
            "DATABASE_URL": f"postgresql://postgres:{DB_PASSWORD}@/ticketd?host={pg.dir}&port={pg.port}",
            "ADMIN_TOKEN": ADMIN_SECRET,
            # Real librdkafka properties, inert while security.protocol is plaintext.
            "KAFKA_CONFIG": f"sasl.username={KAFKA_USER},sasl.password={KAFKA_PASSWORD}",
            # Nothing listens there: e-mails fail and are retried (error paths get logged).
            "SMTP_URL": f"smtp://mailer:{SMTP_PASSWORD}@127.0.0.1:{harness.free_port()}",
            "RETRY_BACKOFF": "100ms",
            "LOG_LEVEL": "debug",
            "CONSUMER_GROUP": harness.unique_group("loghygiene"),
        }

    def assert_clean(self, text, where):
        problems = []
        for n, line in enumerate(text.splitlines(), 1):
            for s in SECRETS:
                if s in line:
                    problems.append(f"{where}:{n}: secret {s!r}: {line}")
            for p in PHONES + [BAD_PHONE]:
                for frag in phone_fragments(p):
                    if frag in line:
                        problems.append(f"{where}:{n}: phone fragment {frag!r}: {line}")
                        break
            for leak in phone_leaks(line):
                problems.append(f"{where}:{n}: phone {leak!r}: {line}")
        self.assertEqual(problems, [], "\n" + "\n".join(problems[:30]))

    def test_no_secret_or_phone_in_service_logs(self):
        env = self.env()
        t = self.track(harness.Ticketd(self.pg, env=env))
        ids = []
        for i, phone in enumerate(PHONES):
            r = t.apply(event_id="hygiene-2026", phone=phone, name=f"Applicant {i}",
                        email=f"applicant{i}@example.com", seats=2, idempotency_key=f"key-{i}")
            self.assertEqual(r.status, 201, r)
            ids.append(r.json()["reference"])
        # Duplicates, an idempotent replay, bad bodies.
        self.assertEqual(t.apply(event_id="hygiene-2026", phone=PHONES[0]).status, 409)
        self.assertIn(t.apply(event_id="hygiene-2026", phone=PHONES[1], name="Applicant 1",
                              email="applicant1@example.com", seats=2,
                              idempotency_key="key-1").status, (200, 201, 409))
        bad = [
            {"event_id": "hygiene-2026", "phone": BAD_PHONE, "name": "Bad Phone"},
            {"event_id": "hygiene-2026", "phone": PHONES[2], "name": "", "seats": 9},
            {"event_id": "bad event id!", "phone": PHONES[3], "name": "X"},
            {"event_id": "hygiene-2026", "phone": PHONES[4], "name": "X", "email": "not-an-email"},
        ]
        for body in bad:
            r = t.request("POST", "/v1/applications", json=body)
            self.assertEqual(r.status, 400, (body, r))
        r = t.request("POST", "/v1/applications",
                      body='{"event_id":"hygiene-2026","phone":"%s",' % PHONES[0],
                      headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 400)
        r = t.request("POST", "/v1/applications", body="phone=" + PHONES[1],
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(r.status, 415)
        # Lookups by phone put the phone in the URL: an access log must not print it (admin
        # lookups are logged, with the phone masked).
        for phone in PHONES[:2]:
            r = t.admin("GET", f"/admin/applications?event_id=hygiene-2026&phone={phone}", token=ADMIN_SECRET)
            self.assertEqual(r.status, 200, r)
        self.assertEqual(t.request("GET", f"/v1/applications/{ids[0]}").status, 200)
        # Admin with a wrong token and with none: refused; then with the right one.
        for token in (WRONG_TOKEN, None):
            r = t.admin("GET", f"/admin/trace?phone={PHONES[0]}", token=token)
            self.assertNotIn(r.status // 100, (2, 5), r)
            r = t.admin("POST", "/admin/dlq/replay", json={}, token=token)
            self.assertNotIn(r.status // 100, (2, 5), r)
        t.admin("GET", f"/admin/trace?phone={PHONES[0]}", token=ADMIN_SECRET)
        t.admin("GET", "/admin/audit?event_id=hygiene-2026", token=ADMIN_SECRET)
        # The relay and the consumer log their work on these applications (when built).
        if os.path.exists(os.path.join(harness.SOURCE_DIR, "src", "outbox_relay.c")):
            harness.wait_until(lambda: self.pg.count("outbox_status WHERE published_at IS NULL") == 0,
                               timeout=60, what="the relay to publish")
        if os.path.exists(os.path.join(harness.SOURCE_DIR, "src", "consumer.c")):
            # SMTP is down: each event ends processed, or dead-lettered after its retries.
            harness.wait_until(lambda: self.pg.unfinished_events() == 0, timeout=90,
                               what="the consumer to handle or dead-letter every event")
        # A PostgreSQL outage: reconnect errors must not print the URL's password.
        self.pg.stop()
        try:
            r = t.apply(event_id="hygiene-2026", phone="010-5555-0000")
            self.assertEqual(r.status, 503, r)
            time.sleep(1.5)  # let reconnect attempts log
        finally:
            self.pg.start()
        t.wait_ready(60)
        self.assertEqual(t.terminate(timeout=60), 0)
        text = t.log_text()
        self.assertGreater(len(text.splitlines()), 10, "a debug-level run logged almost nothing")
        self.assert_clean(text, "ticketd serve")

    def test_no_secret_in_cli_output(self):
        env = self.env()
        for argv in (["migrate"], ["config-table"], ["--help"], ["serve", "--batch-max", "0"],
                     ["serve", "--no-such-flag"]):
            r = harness.run_ticketd(argv, env=env, timeout=60)
            self.assert_clean(r.stdout + r.stderr, "ticketd " + " ".join(argv))
        self.assertEqual(harness.run_ticketd(["migrate"], env=env, timeout=60).returncode, 0)


class LogNeverBlocks(harness.TicketdTestCase):
    """Issue 12, item 6: on main every line was a blocking write(2) to stderr from the loop,
    so a log reader that stalls (here: a pipe nobody reads) stalled HTTP, Kafka and
    PostgreSQL work with it. Now the loop only appends to a bounded buffer; what does not fit
    is dropped and counted, and lines resume once stderr is read again."""

    def metric(self, port, name):
        text = harness.http_request(port, "GET", "/metrics", timeout=10).body.decode()
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else None

    @staticmethod
    def _up(port):
        try:
            return harness.http_request(port, "GET", "/readyz", timeout=2).status == 200
        except OSError:
            return False

    def test_stuck_stderr_does_not_stall_http(self):
        port = harness.free_port()
        env = dict(os.environ, DATABASE_URL=self.pg.url, KAFKA_BROKERS="", ROLE="api",
                   LISTEN=f"127.0.0.1:{port}", ADMIN_TOKEN=ADMIN_SECRET, LOG_LEVEL="debug",
                   LOG_BUFFER="16k")
        proc = subprocess.Popen([harness.BIN, "serve"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (proc.kill(), proc.wait(timeout=30), proc.stderr.close()))
        harness.wait_until(lambda: self._up(port), timeout=60, what="ticketd /readyz")
        auth = {"Authorization": f"Bearer {ADMIN_SECRET}"}
        # Each malformed request logs one debug line (event=parse_error, ~110 bytes): the
        # 64 KiB pipe and the 16 KiB buffer fill after about 750; every request must still be
        # answered promptly.
        dropped = None
        for i in range(1, 20001):
            t0 = time.monotonic()
            data = harness.raw_exchange(port, b"NOT-HTTP %d\r\n\r\n" % i, timeout=10)
            self.assertTrue(data.startswith(b"HTTP/1.1 400"),
                            f"request {i} not answered within {time.monotonic() - t0:.1f} s with "
                            f"stderr stuck: {data[:80]!r}")
            if i % 100 == 0:
                dropped = self.metric(port, "ticketd_log_dropped_total")
                if dropped and dropped > 200:
                    break
        self.assertGreater(dropped or 0, 200, "no log line was dropped: was stderr full?")
        for _ in range(20):  # still serving, applications included
            self.assertEqual(harness.http_request(port, "GET", "/healthz", timeout=10).status, 200)
        r = harness.http_request(port, "POST", "/v1/applications", timeout=10, json={
            "event_id": "stuck-log", "phone": "010-5555-1212", "name": "Stuck Log"})
        self.assertEqual(r.status, 201, r)

        # Read the pipe: the buffered lines, the drop report, then new lines again.
        chunks = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(65536), b"")),
                                  daemon=True)
        reader.start()

        def resumed():
            harness.http_request(port, "GET", "/admin/applications/987654321", headers=auth, timeout=10)
            text = b"".join(chunks).decode("utf-8", "replace")
            return "event=lines_dropped" in text and "application_id=987654321" in text
        harness.wait_until(resumed, timeout=30, interval=0.5, what="log lines after the pipe is read")
        after = self.metric(port, "ticketd_log_dropped_total")
        self.assertGreaterEqual(after, dropped)


if __name__ == "__main__":
    unittest.main()
