"""Issue 13: every /admin/... route is authorized in one place (admin_http.c).

Each admin route, with no token configured, answers 403 admin_disabled even to a bearer
token; with a token configured, no token or a wrong one is 401 (WWW-Authenticate) on every
route; unknown admin paths and wrong methods are 404 / 405 as before, and the right token
reaches the handler (its own 400 on a bad parameter)."""
import unittest

import harness
from harness import Ticketd, TicketdTestCase

ROUTES = [("GET", "/admin/applications?event_id=e1&phone=010-1234-5678"),
          ("GET", "/admin/applications/1"), ("GET", "/admin/audit"),
          ("GET", "/admin/trace?phone=010-1234-5678"), ("GET", "/admin/dlq"),
          ("POST", "/admin/dlq/replay"), ("GET", "/admin/report?event_id=e1")]


class AdminAuthTest(TicketdTestCase):
    def test_no_token_configured_refuses_every_route(self):
        td = self.track(Ticketd(self.pg, role="api", env={"ADMIN_TOKEN": ""}))
        for method, path in ROUTES:
            for token in (None, harness.ADMIN_TOKEN, ""):
                r = td.admin(method, path, json={} if method == "POST" else None, token=token)
                self.assertEqual((r.status, r.json()["error"]), (403, "admin_disabled"),
                                 f"{method} {path} token={token!r}")

    def test_wrong_or_missing_token_is_401_everywhere(self):
        td = self.track(Ticketd(self.pg, role="api"))
        for method, path in ROUTES:
            for token in (None, "wrong-token", harness.ADMIN_TOKEN + "x", harness.ADMIN_TOKEN[:-1]):
                r = td.admin(method, path, json={} if method == "POST" else None, token=token)
                self.assertEqual((r.status, r.json()["error"]), (401, "unauthorized"),
                                 f"{method} {path} token={token!r}")
                self.assertIn("Bearer", r.headers.get("www-authenticate", ""))
        # Routing comes first, as before: unknown path 404, wrong method 405 with Allow.
        self.assertEqual(td.admin("GET", "/admin/nothing", token=None).status, 404)
        r = td.admin("POST", "/admin/audit", json={}, token=None)
        self.assertEqual((r.status, r.headers.get("allow")), (405, "GET"))
        # The right token reaches the handlers (their own validation answers).
        self.assertEqual(td.admin("GET", "/admin/trace?phone=12").status, 400)
        self.assertEqual(td.admin("GET", "/admin/report").status, 400)
        self.assertEqual(td.admin("POST", "/admin/dlq/replay", json={}).status, 400)
        self.assertEqual(td.admin("GET", "/admin/applications/0").status, 404)


if __name__ == "__main__":
    unittest.main()
