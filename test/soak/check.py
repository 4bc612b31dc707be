"""The soak's independent check. Ground truth is the client's own record of its 201s; each
stage is read back from its own store, never from ticketd:

    row        applications (psql)             one row per 201, none for a request never answered
    outbox     outbox (psql)                   one event per application
    published  outbox_status.published_at      every row recorded
    topic      ticket-applied (kcat, by key)   a message for every application, none unknown
    processed  processed_events (psql)         every event handled
    points     points_ledger (psql)            exactly one row per event
    sink       the fake sink's record          a 200 for every event's Idempotency-Key
    email      the fake SMTP server's record   exactly one accepted mail per application
    dlq        dead_letters, the DLQ topic     nothing (every event is healthy)
    effects    event_effects                   none left undone
    drain      all of the above, in time       within --drain-bound seconds of the last fault
    audit      `ticketd audit`                 its verdict agrees with this check

A failure names its stage, a count and the first application ids.
"""
import json
import re
import time

import harness as h

TOPIC = "ticket-applied"
SAMPLE = 12
# Kinds of fault that can keep a replica from writing an e-mail's done mark (see excused()).
MARK_BLOCKERS = ("kill", "pause_leader", "pause_consumer", "pg_restart", "pg_read_only",
                 "pg_pause", "partition_pg")
# An e-mail claim lasts 2 x SINK_TIMEOUT + 10 s (effects.c claim_ttl_ms; run.py sets
# SINK_TIMEOUT=2s): a sender that cannot mark its send within it lets another copy send again.
CLAIM_S = 2 * 2.0 + 10.0
DATA_STAGES = ("row", "outbox", "published", "topic", "processed", "points", "effects", "dlq")


def _sample(ids):
    return sorted(ids, key=lambda x: (str(type(x)), x))[:SAMPLE]


class Checker:
    def __init__(self, args, world, load, group, t_healed, journal, unexpected_exits):
        self.a = args
        self.w = world
        self.pg = world["pg"]
        self.load = load
        self.group = group
        self.t_healed = t_healed
        self.journal = journal
        self.unexpected = unexpected_exits
        self.failures = []
        self.notes = []

    def fail(self, stage, what, ids=()):
        ids = list(ids)
        self.failures.append({"stage": stage, "what": what, "count": len(ids),
                              "ids": _sample(ids)})

    # ---------------------------------------------------------------- drain

    def _pending(self):
        """What is still on its way; {} when the pipeline is empty."""
        q = self.pg.scalar(
            "SELECT json_build_object("
            " 'unpublished', (SELECT count(*) FROM outbox_status WHERE published_at IS NULL),"
            " 'unprocessed', (SELECT count(*) FROM outbox o WHERE NOT EXISTS"
            "   (SELECT 1 FROM processed_events p WHERE p.event_id = o.event_id)),"
            " 'effects_undone', (SELECT count(*) FROM event_effects WHERE NOT done))::text")
        left = {k: v for k, v in json.loads(q).items() if v}
        if any(t.is_alive() for t in self.load.workers):
            left["client_requests"] = sum(1 for o in list(self.load.outcomes.values())
                                          if o.status is None)
        return left

    def drain(self):
        bound = self.a.drain_bound
        extra = 60.0
        last = None
        self.drain_timeline = []
        while True:
            el = time.monotonic() - self.t_healed
            try:
                last = self._pending()
            except Exception as e:
                last = {"psql": str(e)[:200]}
            if not self.drain_timeline or el - self.drain_timeline[-1][0] >= 5:
                self.drain_timeline.append((round(el, 1), last))
            if not last:
                return el, {}
            if el > bound + extra:
                return None, last
            time.sleep(1.0)

    # ---------------------------------------------------------------- collect

    def collect(self):
        pg = self.pg
        outs = list(self.load.outcomes.values())
        self.created = {o.i: o for o in outs if o.status == "created"}
        self.app_of = h.application_ids(pg, {i: o.body for i, o in self.created.items()})
        self.rows = {}          # app id -> request index (by the name "Soak <i>")
        self.rows_of_i = {}     # i -> [app ids]
        for aid, name in pg.query("SELECT id, name FROM applications"):
            m = re.fullmatch(r"Soak (\d+)", name)
            i = int(m.group(1)) if m else None
            self.rows[int(aid)] = i
            self.rows_of_i.setdefault(i, []).append(int(aid))
        self.outbox = {}        # app id -> [(event_id, published, partition, offset)]
        self.event_app = {}
        for agg, ev, pub, part, off in pg.query(
                "SELECT aggregate_id, event_id, published_at IS NOT NULL, kafka_partition, "
                "kafka_offset FROM outbox_status"):
            self.outbox.setdefault(int(agg), []).append((ev, pub == "t", part, off))
            self.event_app[ev] = int(agg)
        self.publish_delay = pg.query(
            "SELECT round(max(extract(epoch FROM published_at - created_at))::numeric, 1), "
            "round((percentile_disc(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM "
            "published_at - created_at)))::numeric, 1) FROM outbox_status")[0]
        self.processed = {r[0] for r in pg.query("SELECT event_id FROM processed_events")}
        self.points = {}
        for ev, n in pg.query("SELECT event_id, count(*) FROM points_ledger GROUP BY event_id"):
            self.points[ev] = int(n)
        self.undone = pg.query("SELECT event_id, effect, attempts, last_error FROM event_effects "
                               "WHERE NOT done")
        self.dead = pg.query("SELECT event_id, application_id, error_class, error_message "
                             "FROM dead_letters")
        brokers = self.w["kafka"].brokers
        self.msgs = h.kcat_consume(brokers, TOPIC)
        keys = {m["key"] for m in self.msgs}
        if any(str(a) not in keys for a in self.rows):
            time.sleep(5)   # a second read: is it the topic, or one kcat read?
            again = h.kcat_consume(brokers, TOPIC)
            if len(again) != len(self.msgs):
                self.notes.append(f"two kcat reads of the topic differ: {len(self.msgs)} "
                                  f"and {len(again)} messages; using the larger")
                self.msgs = max(self.msgs, again, key=len)
        self.dlq_msgs = h.kcat_consume(brokers, TOPIC + ".DLQ")
        self.deliveries = self.w["sink"].received()
        self.mails = self.w["smtp"].accepted_log

    # ---------------------------------------------------------------- checks

    def check_client(self):
        outs = list(self.load.outcomes.values())
        gave_up = [o.i for o in outs if o.status == "gave_up"]
        if gave_up:
            self.notes.append(f"{len(gave_up)} requests got no 201 within the client's retry "
                              f"deadline (indeterminate): {_sample(gave_up)}")
        conflict = [o.i for o in outs if o.status == "conflict"]
        if conflict:
            self.fail("row", "a retry with the same Idempotency-Key and body got 409 (request "
                             "indexes)", conflict)
        rejected = [o.i for o in outs if o.status == "rejected"]
        if rejected:
            o = self.load.outcomes[rejected[0]]
            self.fail("row", f"requests rejected (first: {o.body})", rejected)
        unmapped = [i for i in self.created if self.app_of.get(i) is None]
        if unmapped:
            self.fail("row", "201s whose reference has no application row (request indexes)",
                      unmapped)

    def check_rows(self):
        ids = {i: aid for i, aid in self.app_of.items() if aid is not None}
        missing = [aid for aid in ids.values() if aid not in self.rows]
        if missing:
            self.fail("row", "201 without its application row", missing)
        wrong = [aid for i, aid in ids.items() if aid in self.rows and self.rows[aid] != i]
        if wrong:
            self.fail("row", "201 id belongs to another request's row", wrong)
        dup = [i for i, aids in self.rows_of_i.items() if len(aids) > 1]
        if dup:
            self.fail("row", "more than one row for one request (request indexes)", dup)
        gave_up = {o.i for o in self.load.outcomes.values() if o.status == "gave_up"}
        phantom = [aid for aid, i in self.rows.items() if i not in self.created and i not in gave_up]
        if phantom:
            self.fail("row", "rows no client request accounts for", phantom)
        late = [aid for aid, i in self.rows.items() if i in gave_up]
        if late:
            self.notes.append(f"{len(late)} rows of requests the client gave up on (committed, "
                              "answer lost); checked like the others")

    def check_outbox_and_topic(self):
        apps = set(self.rows)
        no_event = [a for a in apps if a not in self.outbox]
        if no_event:
            self.fail("outbox", "application without its outbox event", no_event)
        two = [a for a, evs in self.outbox.items() if len(evs) > 1]
        if two:
            self.fail("outbox", "more than one outbox event for one application", two)
        orphan = [a for a in self.outbox if a not in apps]
        if orphan:
            self.fail("outbox", "outbox events of no application", orphan)
        unpub = [a for a, evs in self.outbox.items() if any(not e[1] for e in evs)]
        if unpub:
            self.fail("published", "outbox row never marked published", unpub)
        by_key = {}
        for m in self.msgs:
            by_key.setdefault(m["key"], []).append(m)
        no_msg = [a for a in apps if str(a) not in by_key]
        if no_msg:
            self.fail("topic", "application without a message in the topic (kcat, by key); "
                               + self._where(no_msg), no_msg)
        bad = []
        for a, evs in self.outbox.items():
            ces = {m["headers"].get("ce_id") for m in by_key.get(str(a), [])}
            if str(a) in by_key and not {e[0] for e in evs} & ces:
                bad.append(a)
            marked = {(int(e[2]), int(e[3])) for e in evs if e[1] and e[2] is not None}
            at = {(m["partition"], m["offset"]) for m in by_key.get(str(a), [])}
            if marked and not marked & at:
                bad.append(a)
        if bad:
            self.fail("topic", "message does not carry the row's event id, or the row points "
                               "at another offset; " + self._where(set(bad)), set(bad))
        unknown = [m["key"] for m in self.msgs if m["headers"].get("ce_id") not in self.event_app]
        if unknown:
            self.fail("topic", "messages of no outbox event (keys)", unknown)
        copies = sum(len(v) - 1 for v in by_key.values() if len(v) > 1)
        if copies:
            self.notes.append(f"{copies} extra copies of messages in the topic (relay re-sends; "
                              "allowed: effects are per event id)")

    def _where(self, apps):
        """What the topic holds where the outbox rows of the first apps say they went."""
        at = {(m["partition"], m["offset"]): m for m in self.msgs}
        top = {}
        for m in self.msgs:
            top[m["partition"]] = max(top.get(m["partition"], -1), m["offset"])
        out = []
        for a in _sample(apps)[:4]:
            for ev, pub, part, off in self.outbox.get(a, []):
                if part is None:
                    out.append(f"{a}: row not marked")
                    continue
                m = at.get((int(part), int(off)))
                held = (f"key {m['key']} ce_id {m['headers'].get('ce_id')}" if m else
                        f"nothing (partition {part} read up to offset {top.get(int(part))})")
                out.append(f"{a}: row says {part}/{off} (event {ev}), topic has {held}")
        return "; ".join(out)

    def check_effects(self):
        unprocessed = [a for ev, a in self.event_app.items() if ev not in self.processed]
        if unprocessed:
            self.fail("processed", "event never processed", unprocessed)
        wrong_points = [a for ev, a in self.event_app.items() if self.points.get(ev, 0) != 1]
        if wrong_points:
            detail = {}
            for ev, a in self.event_app.items():
                n = self.points.get(ev, 0)
                if n != 1:
                    detail[n] = detail.get(n, 0) + 1
            self.fail("points", f"points rows per event not exactly 1 (rows -> events: {detail})",
                      wrong_points)
        ok_keys = {d["key"] for d in self.deliveries if 200 <= d["status"] < 300}
        no_sink = [a for ev, a in self.event_app.items() if ev not in ok_keys]
        if no_sink:
            self.fail("sink", "event the sink never answered 200 for (by Idempotency-Key)", no_sink)
        stray = {d["key"] for d in self.deliveries} - set(self.event_app)
        if stray:
            self.fail("sink", "deliveries with an Idempotency-Key of no event", stray)
        extra = len([d for d in self.deliveries if 200 <= d["status"] < 300]) - len(ok_keys)
        if extra > 0:
            self.notes.append(f"{extra} repeated sink deliveries of one key (allowed: the sink "
                              "deduplicates by Idempotency-Key)")
        self.check_mail()
        if self.undone:
            self.fail("effects", f"effects not done (first: {self.undone[:3]})",
                      [self.event_app.get(r[0], r[0]) for r in self.undone])
        if self.dead:
            classes = {}
            for r in self.dead:
                classes[r[2]] = classes.get(r[2], 0) + 1
            self.fail("dlq", f"healthy events dead-lettered (classes: {classes}; first: "
                             f"{self.dead[0][3][:160]!r})",
                      [int(r[1]) if r[1] else r[0] for r in self.dead])
        if self.dlq_msgs:
            self.fail("dlq", "messages in ticket-applied.DLQ (keys)", [m["key"] for m in self.dlq_msgs])

    def check_mail(self):
        tag = self.load.run_tag
        per_app = {}
        by_i = {i: aids[0] for i, aids in self.rows_of_i.items() if i is not None}
        for m in self.mails:
            for rcpt in m["to"]:
                mm = re.fullmatch(rf"soak-{re.escape(str(tag))}-(\d+)@example\.test", rcpt)
                if not mm:
                    continue
                aid = by_i.get(int(mm.group(1)))
                per_app.setdefault(aid, []).append(m)
        no_mail = [a for a in self.rows if a not in per_app]
        if no_mail:
            self.fail("email", "application without its e-mail", no_mail)
        if None in per_app:
            self.fail("email", "mails to an address of no application", [0] * len(per_app[None]))
        # A copy is in the documented at-least-once window when the replica that sent the
        # copy before it could not record that send before its claim ran out (effects.h):
        # it was SIGKILLed or frozen, cut off from PostgreSQL, or PostgreSQL was down,
        # read-only or frozen, at some moment from that send until the claim's lifetime
        # (CLAIM_S) later. The SMTP server saw each sender's veth address.
        replica_of = {self.w["net"].replica_ip(i): i for i in range(len(self.w["replicas"]))}
        windows = self._mark_blocking_windows()

        def excused(prev, nxt):
            sender = replica_of.get((prev.get("peer") or ("",))[0])
            lo, hi = prev["time"] - 1.0, min(nxt["time"], prev["time"] + CLAIM_S)
            return any((r is None or r == sender) and a <= hi and b >= lo
                       for a, b, r in windows)
        crash_window, second = [], []
        for a, ms in per_app.items():
            if a is None or len(ms) < 2:
                continue
            ms = sorted(ms, key=lambda x: x["time"])
            explained = all(excused(prev, nxt) for prev, nxt in zip(ms, ms[1:]))
            (crash_window if explained else second).append(a)
        if second:
            t0 = self.journal[0]["wall"] - self.journal[0]["t"] if self.journal else 0
            how = []
            for a in _sample(second)[:3]:
                copies = ", ".join(f"{m['time'] - t0:.1f}s from replica"
                                   f"{replica_of.get((m.get('peer') or ('',))[0], '?')}"
                                   for m in sorted(per_app[a], key=lambda x: x["time"]))
                how.append(f"{a}: {copies}")
            self.fail("email", "second e-mail for one application (" + "; ".join(how) + ")",
                      second)
        if crash_window:
            what = ("second e-mail for one application whose first sender could not record "
                    "the send (killed, frozen, or without its database before its claim ran "
                    "out: the documented at-least-once window)")
            if self.a.strict_email:
                self.fail("email", what, crash_window)
            else:
                self.notes.append(f"{len(crash_window)} x {what}: {_sample(crash_window)}")

    def _mark_blocking_windows(self):
        """(start, end, replica or None for all) of every fault that can keep a replica from
        writing an e-mail's done mark: from its inject note to its heal note (a SIGKILL is
        an instant: the killed process never writes it)."""
        open_, out = {}, []
        for j in self.journal:
            if j["kind"] not in MARK_BLOCKERS or "skipped" in j["what"]:
                continue
            m = re.search(r"replica(\d+)", j["what"])
            replica = int(m.group(1)) if m else j["params"].get("replica")
            if j["kind"] == "kill" and j["what"].startswith("SIGKILL"):
                out.append((j["wall"], j["wall"], replica))
                continue
            key = (j["kind"], json.dumps(j["params"], sort_keys=True))
            if key in open_:
                start, r0 = open_.pop(key)
                out.append((start, j["wall"], r0 if r0 is not None else replica))
            elif j["kind"] != "kill":
                open_[key] = (j["wall"], replica)
        end = time.time()
        out += [(start, end, r) for start, r in open_.values()]
        return out

    def check_audit(self):
        env = {"DATABASE_URL": self.pg.url, "KAFKA_BROKERS": self.w["kafka"].brokers,
               "CONSUMER_GROUP": self.group, "AUDIT_GRACE": "0s"}
        data_ok = not any(f["stage"] in DATA_STAGES for f in self.failures)
        want = f"complete: {len(self.rows)} applications, 0 missing"
        deadline = time.monotonic() + (30 if data_ok else 0)
        while True:
            r = h.run_ticketd(["audit"], env=env, timeout=180)
            lines = r.stdout.strip().splitlines()
            verdict = lines[-1] if lines else f"(no output; rc {r.returncode}) {r.stderr[-300:]}"
            complete = r.returncode == 0 and verdict == want
            if complete or not data_ok or time.monotonic() > deadline:
                break
            time.sleep(3)
        self.audit = {"rc": r.returncode, "verdict": verdict}
        if data_ok and not complete:
            self.fail("audit", f"audit says {verdict!r} (rc {r.returncode}) but every application "
                               f"is accounted for; expected {want!r}")
        if not data_ok and (complete or verdict.startswith("complete")):
            stages = sorted({f["stage"] for f in self.failures if f["stage"] in DATA_STAGES})
            self.fail("audit", f"audit says {verdict!r} (rc {r.returncode}) although the check "
                               f"failed at: {', '.join(stages)}")

    def run(self):
        drained, left = self.drain()
        self.drained_after = drained
        if drained is None:
            self.fail("drain", f"not drained {self.a.drain_bound:g}+60 s after the faults ended; "
                               f"left: {left}")
        elif drained > self.a.drain_bound:
            self.fail("drain", f"drained only after {drained:.1f}s (bound "
                               f"{self.a.drain_bound:g}s)")
        if not self.load.join(timeout=5):
            self.notes.append("client requests still retrying at the check")
        self.collect()
        self.check_client()
        self.check_rows()
        self.check_outbox_and_topic()
        self.check_effects()
        for u in self.unexpected:
            if u["rc"] is not None and u["rc"] < 0:
                self.fail("crash", f"replica{u['replica']}.{u['incarnation']} died of signal "
                                   f"{-u['rc']} at {u['t']}s")
            else:
                self.notes.append(f"replica{u['replica']}.{u['incarnation']} exited by itself "
                                  f"(rc {u['rc']}) at {u['t']}s; restarted")
        self.check_audit()
        self.notes.append(f"commit -> published: max {self.publish_delay[0]} s, p99 "
                          f"{self.publish_delay[1]} s (a relay that stalls shows here)")
        return {"load": self.load.summary(), "applications": len(self.rows),
                "created_201": len(self.created), "messages": len(self.msgs),
                "deliveries": len(self.deliveries), "mails": len(self.mails),
                "drained_after_s": None if drained is None else round(drained, 1),
                "drain_left": left, "drain_timeline": self.drain_timeline, "audit": self.audit, "failures": self.failures,
                "notes": self.notes, "journal": self.journal}


def render(rep):
    out = [f"soak: load {rep['load']}",
           f"soak: {rep['created_201']} x 201, {rep['applications']} rows, {rep['messages']} "
           f"messages, {rep['deliveries']} sink deliveries, {rep['mails']} mails",
           f"soak: drained after {rep['drained_after_s']} s" if rep["drained_after_s"] is not None
           else f"soak: NOT drained; left {rep['drain_left']}",
           f"soak: audit rc {rep['audit']['rc']}: {rep['audit']['verdict'][:300]}"]
    if rep["drained_after_s"] is None or rep["drained_after_s"] > 20:
        out.append("soak: draining (s after the faults: what was left): " + "; ".join(
            f"{t}: {left or 'nothing'}" for t, left in rep["drain_timeline"]))
    for n in rep["notes"]:
        out.append(f"soak: note: {n}")
    for f in rep["failures"]:
        ids = f": {f['count']} (first ids: {f['ids']})" if f["count"] else ""
        out.append(f"soak: FAILED [{f['stage']}] {f['what']}{ids}")
    return "\n".join(out)
