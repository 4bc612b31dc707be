"""Runs a C test program against a throwaway PostgreSQL: `with_pg.py PROGRAM [ARGS]`.
The program finds the database in TICKETD_TEST_DATABASE_URL; its exit code is ours."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration"))
import harness  # noqa: E402

pg = harness.Pg()
try:
    env = dict(os.environ, TICKETD_TEST_DATABASE_URL=pg.url)
    rc = subprocess.run(sys.argv[1:], env=env, timeout=300).returncode
finally:
    pg.close()
sys.exit(rc)
