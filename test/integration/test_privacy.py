"""Issue 12, item 1: no enumeration, no personal data without the admin token.

On main `GET /v1/applications/1` answered the full record (name, phone, e-mail) to anyone,
ids were sequential, and `GET /v1/applications?event_id=&phone=` was public too. Here a
stranger walks ids and guesses references, with and without the token, and every public
answer (201, 409, status lookups, 404s) is searched for the applicants' phone numbers
(in every spelling), e-mail addresses and names. docs/PRIVACY.md is the threat model."""
import re
import unittest
import urllib.parse
import uuid

import harness
from harness import ApiTestCase, Ticketd

EVENT = "privacy-2026"
PEOPLE = [
    {"phone": "010-4821-7730", "name": "Seo Minji", "email": "minji.seo@example.com"},
    {"phone": "010-9134-0562", "name": "김하늘", "email": "haneul@example.org"},
    {"phone": "011-345-6789", "name": "Oh Daeun", "email": "daeun@example.net"},
]
REFERENCE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def secrets_of(person):
    """The strings that must never reach a stranger: the phone in every spelling, the name
    (and its parts), the e-mail (and its local part)."""
    digits = "".join(c for c in person["phone"] if c.isdigit())
    out = {person["phone"], digits, digits[3:], person["email"], person["email"].split("@")[0],
           person["name"]}
    out.update(p for p in person["name"].split() if len(p) > 2)
    return out


class PrivacyTest(ApiTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.created = []
        for p in PEOPLE:
            r = cls.td.apply(event_id=EVENT, phone=p["phone"], name=p["name"], email=p["email"])
            assert r.status == 201, r
            cls.created.append(r.json())
        cls.secrets = set().union(*(secrets_of(p) for p in PEOPLE))

    def assert_no_pii(self, what, r):
        text = r.body.decode("utf-8", "replace") if isinstance(r.body, bytes) else str(r.body)
        text += "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        leaked = sorted(s for s in self.secrets if s in text)
        self.assertEqual(leaked, [], f"{what} leaks personal data: {text[:400]}")

    def test_201_carries_a_random_reference_not_the_id(self):
        for body in self.created:
            self.assertEqual(sorted(body), ["created_at", "event_id", "reference", "status"], body)
            self.assertRegex(body["reference"], REFERENCE)
        self.assertEqual(len({b["reference"] for b in self.created}), len(self.created))
        refs = self.pg.query("SELECT reference FROM applications ORDER BY id")
        self.assertEqual([r[0] for r in refs], [b["reference"] for b in self.created])
        # the 201s themselves carry nothing personal
        r = self.td.apply(event_id="privacy-other", phone=PEOPLE[0]["phone"],
                          name=PEOPLE[0]["name"], email=PEOPLE[0]["email"])
        self.assertEqual(r.status, 201)
        self.assert_no_pii("201", r)

    def test_409_names_no_reference_and_no_data(self):
        for p, created in zip(PEOPLE, self.created):
            r = self.td.apply(event_id=EVENT, phone=p["phone"].replace("-", ""), name="A Stranger")
            self.assertEqual(r.status, 409, r)
            self.assertEqual(r.json()["error"], "already_applied")
            self.assertNotIn(created["reference"], r.body.decode())
            self.assertNotIn("reference", r.json())
            self.assertNotIn("id", r.json())
            self.assert_no_pii("409", r)

    def test_status_by_reference_is_masked(self):
        for p, created in zip(PEOPLE, self.created):
            r = self.td.request("GET", f"/v1/applications/{created['reference']}")
            self.assertEqual(r.status, 200, r)
            got = r.json()
            self.assertEqual(got["reference"], created["reference"])
            self.assertEqual(got["status"], "applied")
            self.assertEqual(sorted(got), ["created_at", "event_id", "phone", "reference", "seats",
                                           "status"])
            digits = "".join(c for c in p["phone"] if c.isdigit())
            stars = "****" if len(digits) == 11 else "***"
            self.assertEqual(got["phone"], f"{digits[:3]}-{stars}-{digits[-4:]}")
            self.assert_no_pii("status lookup", r)

    def test_walking_ids_and_guessing_references_finds_nothing(self):
        n = int(self.pg.scalar("SELECT max(id) FROM applications")) + 5
        probes = [f"/v1/applications/{i}" for i in range(0, n + 1)]
        probes += [f"/v1/applications/{uuid.uuid4()}" for _ in range(30)]
        probes += [f"/v1/applications/{self.created[0]['reference'][:-1]}x",
                   "/v1/applications/../admin/applications/1",
                   "/v1/applications/1%20OR%201=1", "/v1/applications/%00"]
        probes += [f"/v1/applications?{urllib.parse.urlencode({'event_id': EVENT, 'phone': p['phone']})}"
                   for p in PEOPLE]
        probes += [f"/admin/applications/{i}" for i in range(1, n + 1)]
        probes += [f"/admin/applications?{urllib.parse.urlencode({'event_id': EVENT, 'phone': p['phone']})}"
                   for p in PEOPLE]
        statuses = {}
        for path in probes:
            for token in (None, "wrong-token", harness.ADMIN_TOKEN):
                if path.startswith("/admin/") and token == harness.ADMIN_TOKEN:
                    continue  # the admin's answers are checked below
                h = {"Authorization": f"Bearer {token}"} if token else {}
                r = self.td.request("GET", path, headers=h)
                statuses[r.status] = statuses.get(r.status, 0) + 1
                self.assertIn(r.status, (401, 404, 405), f"{path} token={token}: {r.status} {r.body[:200]}")
                self.assert_no_pii(f"GET {path} token={token}", r)
        self.assertGreater(statuses.get(404, 0), n, statuses)
        # the old public lookup by (event_id, phone) is gone: GET there is not allowed
        q = urllib.parse.urlencode({"event_id": EVENT, "phone": PEOPLE[0]["phone"]})
        r = self.td.admin("GET", f"/v1/applications?{q}")
        self.assertEqual(r.status, 405, r)

    def test_admin_reads_full_records_with_the_token(self):
        ids = [self.pg.application_id(b) for b in self.created]
        for p, i, created in zip(PEOPLE, ids, self.created):
            r = self.td.admin("GET", f"/admin/applications/{i}")
            self.assertEqual(r.status, 200, r)
            got = r.json()
            self.assertEqual((got["id"], got["reference"], got["name"], got["email"]),
                             (i, created["reference"], p["name"], p["email"]))
            q = urllib.parse.urlencode({"event_id": EVENT, "phone": p["phone"]})
            r = self.td.admin("GET", f"/admin/applications?{q}")
            self.assertEqual(r.status, 200, r)
            self.assertEqual([a["id"] for a in r.json()["applications"]], [i])
        # the admin reads are logged, without the phone
        log = self.td.log_text()
        self.assertIn("event=admin_lookup", log)
        self.assertIn("event=admin_read", log)
        for p in PEOPLE:
            digits = "".join(c for c in p["phone"] if c.isdigit())
            self.assertNotIn(digits, log)
            self.assertNotIn(p["phone"], log)

    def test_a_malformed_reference_is_404_without_a_query(self):
        """Anything that is not a UUID is answered before the database: with PostgreSQL
        stopped it is still a 404, while a well-formed reference needs the database."""
        td = self.track(Ticketd(self.pg, role="api", name="ticketd-nodb"))
        self.pg.stop()
        try:
            for bad in ("1", "abc", "0" * 36, str(uuid.uuid4()).replace("-", "")):
                r = td.request("GET", f"/v1/applications/{bad}")
                self.assertEqual(r.status, 404, f"{bad}: {r}")
            r = td.request("GET", f"/v1/applications/{uuid.uuid4()}")
            self.assertEqual(r.status, 503, r)
        finally:
            self.pg.start()
            harness.wait_until(lambda: self.td.request("GET", "/readyz").status == 200,
                               timeout=60, what="ticketd reconnected")


if __name__ == "__main__":
    unittest.main()
