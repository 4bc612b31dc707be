"""A data-platform sink for tests: an HTTP server that records every POST and can be told to
fail (Python 3 stdlib only).

In a test (same process, server on a thread):

    sink = FakeSink()                 # 127.0.0.1:<free port>, .url
    sink.fail_all(500)                # every POST answers 500 (after recording it)
    sink.fail_matching("01012345678") # POSTs whose body contains the text answer 500
    sink.hold()                       # record, then keep the reply back until release()
    sink.slow(2.5)                    # record, answer 200 after 2.5 s
    sink.ok()                         # back to 200 for everything (also releases held ones)
    sink.received()                   # [{'seq','key','body'(parsed JSON),'status'}], in arrival order
    sink.wait_for(n, timeout)         # until n requests were received
    sink.close()

Standalone (demo, manual runs): `python3 fake_sink.py --port 9000`, controlled over HTTP:
POST /_control {"mode": "ok"|"fail_all"|"fail_match"|"hold"|"slow", "status": 500, "match": "...",
"delay": 2.5},
GET /_received. Every other POST is a delivery.
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _State:
    def __init__(self):
        self.lock = threading.Condition()
        self.mode = "ok"
        self.status = 500
        self.match = None
        self.delay = 0.0
        self.released = threading.Event()
        self.records = []

    def decide(self, body_text):
        """(status, hold) for a request, under the lock."""
        if self.mode == "fail_all":
            return self.status, False
        if self.mode == "fail_match" and self.match and self.match in body_text:
            return self.status, False
        if self.mode == "hold":
            return 200, True
        return 200, False

    def delay_for(self):
        """Seconds to wait before answering (mode slow), under the lock."""
        return self.delay if self.mode == "slow" else 0.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state = None  # set per server class

    def log_message(self, fmt, *args):  # quiet
        pass

    def _reply(self, status, obj):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a test killed it while the reply was held)

    def do_GET(self):
        if self.path == "/_received":
            with self.state.lock:
                self._reply(200, list(self.state.records))
        else:
            self._reply(404, {"error": "not_found"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        st = self.state
        if self.path == "/_control":
            cmd = json.loads(raw or b"{}")
            with st.lock:
                st.mode = cmd.get("mode", "ok")
                st.status = int(cmd.get("status", 500))
                st.match = cmd.get("match")
                st.delay = float(cmd.get("delay", 0))
                if st.mode != "hold":
                    st.released.set()
                else:
                    st.released.clear()
            self._reply(200, {"mode": st.mode})
            return
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        with st.lock:
            status, hold = st.decide(text)
            delay = st.delay_for()
            rec = {"seq": len(st.records), "key": self.headers.get("Idempotency-Key"),
                   "content_type": self.headers.get("Content-Type"), "body": body,
                   "status": status, "time": time.time()}
            st.records.append(rec)
            st.lock.notify_all()
        if hold:
            st.released.wait(timeout=120)
        elif delay:
            time.sleep(delay)
        self._reply(status, {"ok": 200 <= status < 300})


class FakeSink:
    def __init__(self, port=0, host="127.0.0.1"):
        self.state = _State()
        handler = type("SinkHandler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _set(self, mode, status=500, match=None):
        with self.state.lock:
            self.state.mode, self.state.status, self.state.match = mode, status, match
            if mode == "hold":
                self.state.released.clear()
            else:
                self.state.released.set()

    def ok(self):
        self._set("ok")

    def fail_all(self, status=500):
        self._set("fail_all", status)

    def fail_matching(self, text, status=500):
        self._set("fail_match", status, text)

    def hold(self):
        self._set("hold")

    def slow(self, seconds):
        """Every POST is recorded and answered 200, seconds later."""
        with self.state.lock:
            self.state.delay = float(seconds)
        self._set("slow")

    def received(self):
        with self.state.lock:
            return [dict(r) for r in self.state.records]

    def wait_for(self, n, timeout=30.0):
        deadline = time.monotonic() + timeout
        with self.state.lock:
            while len(self.state.records) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink received {len(self.state.records)} of {n} requests")
                self.state.lock.wait(left)
            return [dict(r) for r in self.state.records]

    def close(self):
        self.state.released.set()
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    s = FakeSink(a.port, a.host)
    print(f"fake sink on {s.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.close()
