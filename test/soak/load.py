"""The soak's rush: threads posting applications at a target rate to random replicas.

Every application i has its own phone, name and e-mail address (soak-<run>-<i>@example.test)
and its own Idempotency-Key; on an error, a 5xx, a 429 or a timeout the client retries, with
the same key and body, on a replica chosen at random, until a 201 or its retry deadline.
The record (i -> outcome) is the checker's ground truth: it trusts nothing ticketd says
afterwards.
"""
import http.client
import json
import random
import threading
import time

from harness import phone_for

RETRYABLE = {429, 500, 502, 503, 504}


class Outcome:
    __slots__ = ("i", "status", "body", "tries", "answers", "t_first", "t_done")

    def __init__(self, i):
        self.i = i
        self.status = None     # "created" | "gave_up" | "conflict" | "rejected"
        self.body = None       # the 201 body
        self.tries = 0
        self.answers = {}      # answer (status code or error class) -> count
        self.t_first = None
        self.t_done = None


class Load:
    def __init__(self, targets, rate, seed, run_tag, event_id="soak-2026", threads=24,
                 retry_deadline=120.0, timeout=3.0):
        self.targets = targets            # [(host, port)] of the replicas
        self.rate = float(rate)
        self.seed = seed
        self.run_tag = run_tag
        self.event_id = event_id
        self.threads = threads
        self.retry_deadline = retry_deadline
        self.timeout = timeout
        self.lock = threading.Lock()
        self.next_i = 0
        self.t0 = None
        self.stopping = threading.Event()
        self.outcomes = {}
        self.workers = []

    def body(self, i):
        return {"event_id": self.event_id, "phone": phone_for(i),
                "name": f"Soak {i}", "email": self.email(i)}

    def email(self, i):
        return f"soak-{self.run_tag}-{i}@example.test"

    def key(self, i):
        return f"soak-{self.run_tag}-{i}"

    def start(self):
        self.t0 = time.monotonic()
        for n in range(self.threads):
            t = threading.Thread(target=self._work, args=(n,), daemon=True, name=f"load-{n}")
            t.start()
            self.workers.append(t)

    def stop(self):
        """No new applications; those under way keep retrying until their deadline."""
        self.stopping.set()

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.workers:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.workers)

    def _claim(self):
        with self.lock:
            i = self.next_i
            self.next_i += 1
            o = self.outcomes[i] = Outcome(i)
        due = self.t0 + i / self.rate
        wait = due - time.monotonic()
        if wait > 0:
            self.stopping.wait(wait)
        return o

    def _work(self, n):
        conns = {}
        rng = random.Random(f"{self.seed}-load-{n}")
        while not self.stopping.is_set():
            o = self._claim()
            if self.stopping.is_set() and o.tries == 0:
                with self.lock:
                    del self.outcomes[o.i]  # claimed after the stop: never sent
                break
            self._apply(o, rng, conns)
        for c in conns.values():
            c.close()

    def _count(self, o, answer):
        o.answers[answer] = o.answers.get(answer, 0) + 1

    def _apply(self, o, rng, conns):
        body = json.dumps(self.body(o.i)).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": self.key(o.i)}
        o.t_first = time.time()
        deadline = time.monotonic() + self.retry_deadline
        pause = 0.1
        while True:
            target = rng.randrange(len(self.targets))
            o.tries += 1
            try:
                c = conns.get(target)
                if c is None:
                    host, port = self.targets[target]
                    c = conns[target] = http.client.HTTPConnection(host, port, timeout=self.timeout)
                c.request("POST", "/v1/applications", body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    c.close()
                    conns.pop(target, None)
                status = r.status
            except (OSError, http.client.HTTPException) as e:
                conns.pop(target, None)
                try:
                    c.close()
                except Exception:
                    pass
                status = type(e).__name__
            self._count(o, status)
            if status == 201:
                o.status, o.body = "created", json.loads(data)
                break
            if status == 409:
                answer = json.loads(data or b"{}")
                # "idempotency_key_in_flight": the first try with this key is still queued or
                # being written (a stalled database); the contract says retry for its answer
                if answer.get("error") != "idempotency_key_in_flight":
                    o.status, o.body = "conflict", answer
                    break
                status = "409 in flight"
            if isinstance(status, int) and status not in RETRYABLE:
                o.status, o.body = "rejected", {"status": status, "body": data[:300].decode("utf-8", "replace")}
                break
            if time.monotonic() > deadline:
                o.status = "gave_up"
                break
            time.sleep(pause * (0.5 + rng.random()))
            pause = min(pause * 2, 1.0)
        o.t_done = time.time()

    def summary(self):
        with self.lock:
            outs = list(self.outcomes.values())
        by = {}
        answers = {}
        for o in outs:
            by[o.status] = by.get(o.status, 0) + 1
            for k, v in o.answers.items():
                answers[str(k)] = answers.get(str(k), 0) + v
        return {"sent": len(outs), "outcomes": by, "answers": answers}
