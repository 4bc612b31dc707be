#!/usr/bin/env python3
"""The fault soak: a seeded, randomized, overlapping schedule of faults over a rush of
applications against N ticketd replicas that share one PostgreSQL and the Kafka mock, then
an independent check (check.py) and `ticketd audit`, whose verdict must agree.

    python3 test/soak/soak.py [--seed S] [--duration 120] [--replicas 3] [--rate 150]

It prints its seed first; the same seed replays the same schedule (the fault kinds, targets,
start times and lengths; "the relay leader" is whichever replica leads at that moment). Exit
status: 0 pass, 1 the check failed, 2 the soak could not be set up (no netns, nft, root ...).
Needs root (network namespaces, nft), PostgreSQL 15, kcat and a built ticketd (TICKETD_BIN).
"""
import argparse
import os
import random
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)

# Faults ------------------------------------------------------------------------------------
# kind: (weight, (min, max) seconds the fault lasts). The consumer retries an effect 15 times,
# 1 s apart (RETRY_MAX_ATTEMPTS, RETRY_BACKOFF in run.py): faults of the sink and of SMTP stay
# well inside that budget, and after one of them the sink (or SMTP) stays healthy for
# COOL_DOWN s, so no event is unhealthy, and a dead letter is always a defect. Faults of our
# own PostgreSQL last longer than the budget on purpose: they must delay events, never
# dead-letter them. Freezes stay shorter than the consumer session (6 s): a member frozen
# through a rebalance that then re-sends its JoinGroup makes librdkafka 2.0.2's mock abort
# (rd_kafka_mock_cgrp_member_add: Assertion `!member->resp'), seen in 10-minute runs; the
# relay lease (RELAY_LEASE_TTL=3s in run.py) still changes hands within such a freeze.
KINDS = {
    "kill":            (3, (0.5, 4.0)),   # SIGKILL a replica, restart it after the pause
    "pause_leader":    (2, (2.0, 5.5)),   # SIGSTOP the replica whose relay is active
    "pause_consumer":  (2, (1.0, 5.5)),   # SIGSTOP a replica (each one consumes)
    "pg_restart":      (2, (0.5, 4.0)),   # stop (fast or immediate), start after the pause
    "pg_read_only":    (2, (5.0, 30.0)),  # default_transaction_read_only = on, then off
    "pg_pause":        (1, (1.0, 5.0)),   # SIGSTOP every PostgreSQL process
    "kafka_down_all":  (2, (1.0, 6.0)),
    "kafka_down_one":  (2, (2.0, 10.0)),
    "kafka_pause":     (1, (1.0, 5.0)),   # SIGSTOP the mock cluster
    "produce_errors":  (2, (2.0, 8.0)),   # the next Produce requests answer an error
    "sink_500":        (2, (2.0, 6.0)),
    "sink_timeout":    (1, (2.0, 6.0)),   # the sink holds its answers past SINK_TIMEOUT
    "sink_slow":       (1, (2.0, 6.0)),   # answers after 0.5-3 s
    "smtp_refuse":     (2, (2.0, 6.0)),   # 451 to every DATA
    "partition_pg":    (2, (2.0, 25.0)),  # nft: replica <-> PostgreSQL, drop or reject
    "partition_kafka": (2, (2.0, 20.0)),  # nft: replica <-> every broker, drop or reject
}
COOL_DOWN = {"sink": 12.0, "smtp": 12.0}
PRODUCE_ERRORS = {"REQUEST_TIMED_OUT": 7, "NOT_ENOUGH_REPLICAS": 19, "NOT_LEADER_FOR_PARTITION": 6}


def make_schedule(seed, duration, replicas, mean_gap=2.0, warmup=3.0):
    """The faults of a run: a list of dicts (at, end, kind, resource, params), from the seed
    alone. Faults overlap freely except on the same resource (one process, PostgreSQL, the
    Kafka cluster, the sink, SMTP, one replica's network path to one peer)."""
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    busy = {}
    out = []
    t = warmup
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= duration - 1.0:
            break
        kind = rng.choices(kinds, weights)[0]
        lo, hi = KINDS[kind][1]
        length = round(rng.uniform(lo, hi), 2)
        params = {}
        if kind in ("kill", "pause_consumer"):
            params["replica"] = rng.randrange(replicas)
            resource = f"replica{params['replica']}"
        elif kind == "pause_leader":
            resource = "leader"
        elif kind.startswith("pg_"):
            resource = "pg"
            if kind == "pg_restart":
                params["mode"] = rng.choice(["fast", "immediate"])
        elif kind.startswith("kafka_") or kind == "produce_errors":
            resource = "kafka"
            if kind == "kafka_down_one":
                params["broker"] = rng.randint(1, 3)
            if kind == "produce_errors":
                params["error"] = rng.choice(sorted(PRODUCE_ERRORS))
                params["count"] = rng.randint(5, 60)
        elif kind.startswith("sink_"):
            resource = "sink"
            if kind == "sink_slow":
                params["delay"] = round(rng.uniform(0.5, 3.0), 2)
        elif kind == "smtp_refuse":
            resource = "smtp"
        else:
            params["replica"] = rng.randrange(replicas)
            params["mode"] = rng.choice(["drop", "reject"])
            resource = f"net{params['replica']}{kind.split('_')[1]}"
        if busy.get(resource, 0) > t:
            continue
        end = min(t + length, duration)
        busy[resource] = end + COOL_DOWN.get(resource, 0.5)
        out.append({"at": round(t, 2), "end": round(end, 2), "kind": kind, "resource": resource,
                    "params": params})
    return out


def describe(f):
    p = " ".join(f"{k}={v}" for k, v in sorted(f["params"].items()))
    return f"{f['at']:7.2f}s..{f['end']:7.2f}s  {f['kind']:<16} {p}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="random if not given (printed)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load and faults")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--rate", type=float, default=150.0, help="applications per second")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--drain-bound", type=float, default=60.0,
                    help="seconds after the last fault within which everything must be handled")
    ap.add_argument("--mean-gap", type=float, default=2.0, help="mean seconds between faults")
    ap.add_argument("--strict-email", action="store_true",
                    help="also fail on a second e-mail sent across a SIGKILL (the documented "
                         "at-least-once window)")
    ap.add_argument("--schedule-only", action="store_true", help="print the schedule and exit")
    ap.add_argument("--keep", action="store_true", help="keep the run directory on a pass")
    a = ap.parse_args(argv)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 2**31)
    print(f"soak: seed {a.seed} (replay: --seed {a.seed} --duration {a.duration:g} "
          f"--replicas {a.replicas})", flush=True)
    schedule = make_schedule(a.seed, a.duration, a.replicas, a.mean_gap)
    print(f"soak: {len(schedule)} faults:", flush=True)
    for f in schedule:
        print("  " + describe(f), flush=True)
    if a.schedule_only:
        return 0
    # The harness's watchdog must outlive the run (set before harness is imported).
    os.environ.setdefault("TICKETD_TEST_WATCHDOG", str(int(a.duration + a.drain_bound + 900)))
    import run as runmod
    return runmod.run(a, schedule)


if __name__ == "__main__":
    def _term(signum, frame):
        sys.exit(128 + signum)  # atexit then closes everything (processes, netns, nft)
    signal.signal(signal.SIGTERM, _term)
    sys.exit(main())
