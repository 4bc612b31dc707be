"""The short fault soak (test/soak/soak.py): three replicas, one PostgreSQL, the Kafka mock,
a rush of applications and a seeded random schedule of overlapping faults for about two
minutes, then the independent check and `ticketd audit`. The seed is printed; SOAK_SEED
replays a run, SOAK_DURATION changes its length, SOAK_DRAIN_BOUND the seconds allowed to
drain after the last fault (90; 120 under the sanitizers). Needs root (network namespaces, nft): a
machine or chroot without them fails here with the reason, it does not skip.
"""
import os
import random
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SOAK = os.path.join(os.path.dirname(HERE), "soak", "soak.py")
DEFAULT_SEED = "1234"


class SoakTest(unittest.TestCase):

    def test_short_soak(self):
        # A fixed seed by default, so that CI judges the code, not the luck of a schedule;
        # SOAK_SEED=random draws a new one (printed, replayable) to look for new failures.
        seed = os.environ.get("SOAK_SEED") or DEFAULT_SEED
        if seed == "random":
            seed = str(random.SystemRandom().randrange(1, 2**31))
        duration = float(os.environ.get("SOAK_DURATION", "120"))
        # The sanitizer build (test/run's second stage) runs ticketd 2-3 times slower.
        sanitized = "ASAN_OPTIONS" in os.environ
        drain = os.environ.get("SOAK_DRAIN_BOUND") or ("120" if sanitized else "90")
        # 80/s (40/s sanitized): below what the effects stage (sink + SMTP per event, one
        # event at a time per partition) sustains on a busy 2-core machine while the sink
        # is slow or SMTP refuses, so the drain bound measures recovery from faults, not a
        # backlog. At 80/s under ASan a slower CI machine left more than 120 s of backlog.
        rate = os.environ.get("SOAK_RATE") or ("40" if sanitized else "80")
        argv = [sys.executable, SOAK, "--seed", seed, "--duration", f"{duration:g}",
                "--replicas", "3", "--drain-bound", drain, "--rate", rate]
        print(f"test_soak: {' '.join(argv)}", file=sys.stderr, flush=True)
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=duration + 600)
        print(r.stdout, file=sys.stderr, flush=True)
        if r.returncode == 3:
            # The mock cluster aborted (its own assertion, not ticketd): the run judged
            # nothing, so it is repeated once with the same seed.
            print("test_soak: the Kafka mock aborted; running the same seed again",
                  file=sys.stderr, flush=True)
            r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=duration + 600)
            print(r.stdout, file=sys.stderr, flush=True)
        if r.returncode == 2:
            self.fail(f"the soak could not be set up (seed {seed}); see SETUP FAILED above")
        # The verdict lines again, last, so that a log cut in the middle still shows why.
        verdict = [l for l in r.stdout.splitlines()
                   if l.startswith(("soak: FAIL", "soak: drained", "soak: NOT drained",
                                    "soak: audit", "soak: load", "soak: draining"))
                   or l.startswith("  [")]
        self.assertEqual(r.returncode, 0, f"the soak failed with seed {seed}: replay with "
                                          f"SOAK_SEED={seed}\n" + "\n".join(verdict[-40:]))


if __name__ == "__main__":
    unittest.main()
