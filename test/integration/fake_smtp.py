"""An SMTP server for tests (Debian's python3-aiosmtpd) that records messages and can be
told to refuse them.

    smtp = FakeSmtp()            # 127.0.0.1:<free port>; .url is smtp://127.0.0.1:<port>
    smtp.refuse()                # DATA answers 451 (a temporary failure) after recording the try
    smtp.accept()
    smtp.messages()              # accepted: [{'from','to':[...],'message_id','data'}]
    smtp.refused_count()         # transactions refused so far
    smtp.close()

Standalone: `python3 fake_smtp.py --port 2525` prints accepted messages' Message-IDs.
"""
import argparse
import email
import sys
import threading
import time

try:
    from aiosmtpd.controller import Controller
except ImportError:
    # Debian's python3-aiosmtpd lives in the system interpreter's dist-packages; a python3
    # from elsewhere first on PATH (pyenv) does not search it.
    sys.path.append("/usr/lib/python3/dist-packages")
    from aiosmtpd.controller import Controller


class _Handler:
    def __init__(self):
        self.lock = threading.Lock()
        self.refusing = False
        self.accepted = []
        self.refused = 0

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
        msg = email.message_from_bytes(raw)
        with self.lock:
            if self.refusing:
                self.refused += 1
                return "451 4.3.0 Temporarily refusing (test)"
            self.accepted.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                                  "message_id": msg.get("Message-ID"),
                                  "subject": msg.get("Subject"),
                                  "data": raw.decode("utf-8", "replace"), "time": time.time()})
        return "250 Message accepted for delivery"


class FakeSmtp:
    def __init__(self, port=0, host="127.0.0.1"):
        if port == 0:
            import socket
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.handler = _Handler()
        self.controller = Controller(self.handler, hostname=host, port=port)
        self.controller.start()
        self.port = port
        self.url = f"smtp://{host}:{port}"

    def refuse(self):
        with self.handler.lock:
            self.handler.refusing = True

    def accept(self):
        with self.handler.lock:
            self.handler.refusing = False

    def messages(self):
        with self.handler.lock:
            return [dict(m) for m in self.handler.accepted]

    def refused_count(self):
        with self.handler.lock:
            return self.handler.refused

    def close(self):
        self.controller.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=2525)
    a = ap.parse_args()
    s = FakeSmtp(a.port)
    print(f"fake smtp on {s.url}", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(1)
            msgs = s.messages()
            for m in msgs[seen:]:
                print(m["message_id"], m["to"], flush=True)
            seen = len(msgs)
    except KeyboardInterrupt:
        s.close()
