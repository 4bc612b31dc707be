"""test/image-check's last step: `image-run.py ROOTFS` runs the ticketd binary of a built
image's file system (ROOTFS, a mounted image) chrooted there as uid/gid 10001, on the image's
own shared libraries, against a throwaway PostgreSQL on loopback TCP and the in-process Kafka
mock: `ticketd migrate` exits 0 and creates the schema, `ticketd serve` answers /readyz 200
and one POST /v1/applications 201 whose row is read back with psql."""
import os
import stat
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration"))
import harness  # noqa: E402

UID = 10001


def fail(msg):
    print(f"image-run: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main(rootfs):
    binary = os.path.join(rootfs, "usr/local/bin/ticketd")
    if not os.access(binary, os.X_OK):
        fail(f"no executable {binary}")
    # harness starts BIN for every ticketd command: a wrapper that enters the image.
    wrapper_dir = tempfile.mkdtemp(prefix="ticketd-image-run-")
    wrapper = os.path.join(wrapper_dir, "ticketd")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec chroot --userspec={UID}:{UID} "{rootfs}" /usr/local/bin/ticketd "$@"\n')
    os.chmod(wrapper, stat.S_IRWXU)
    harness.BIN = wrapper

    pg = harness.Pg(extra_conf={"listen_addresses": "'127.0.0.1'"})
    url = f"host=127.0.0.1 port={pg.port} user=postgres dbname=ticketd"
    pg.url = url
    try:
        r = harness.run_ticketd(["migrate"], env={"DATABASE_URL": url, "LOG_LEVEL": "info"})
        if r.returncode != 0:
            fail(f"ticketd migrate exited {r.returncode}:\n{r.stdout}{r.stderr}")
        versions = pg.count("schema_migrations")
        if versions < 1:
            fail("ticketd migrate applied no migration")
        print(f"image-run: ticketd migrate: exit 0, {versions} schema versions")

        t = harness.Ticketd(pg, brokers="", start_timeout=90, name="ticketd-image")
        with open(f"/proc/{t.pid}/status") as f:
            uids = [line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))]
        if any(v != str(UID) for ids in uids for v in ids):
            fail(f"ticketd runs as uid/gid {uids}, expected {UID}")
        root = os.readlink(f"/proc/{t.pid}/root")
        if os.path.realpath(root) != os.path.realpath(rootfs):
            fail(f"ticketd's root is {root}, not the image's {rootfs}")
        ready = t.request("GET", "/readyz")
        if ready.status != 200:
            fail(f"/readyz answered {ready.status}")
        a = t.apply(event_id="image-check", phone="010-1000-0001")
        if a.status != 201:
            fail(f"POST /v1/applications answered {a.status}: {a.body[:300]!r}")
        app_id = pg.application_id(a.json())
        if app_id is None or pg.count(f"applications WHERE id = {app_id} AND event_id = 'image-check'") != 1:
            fail(f"no row for the 201 {a.body!r}")
        print(f"image-run: ticketd serve as uid {UID} in the image: /readyz 200, 201 -> row {app_id}")
        code = t.terminate()
        if code != 0:
            fail(f"ticketd serve exited {code} after SIGTERM")
    finally:
        harness._cleanup_all()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: image-run.py ROOTFS", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
