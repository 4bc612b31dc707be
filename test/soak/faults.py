"""Fault injectors for the soak (Python 3 stdlib; iproute2, nft and util-linux's nsenter).

Network: every replica runs in a network namespace of its own, joined to the host by a veth
pair. The namespace's loopback has no 127.0.0.0/8 address; that range is routed out of the
veth to the host, which accepts it (route_localnet=1 on its end). So a replica reaches the
servers the soak starts on 127.0.0.1 (PostgreSQL over TCP, the Kafka mock whose brokers
advertise 127.0.0.1, the fake sink, the fake SMTP server) unchanged, but always through its
own veth, where nft rules in the run's own table cut it off:

    drop    packets of the replica to the peer's ports and back are dropped (a silent peer:
            TCP hangs until its own timeouts)
    reject  both ends get a TCP reset (the kernel reports the cut at once)

Names carry the soak's pid (netns soak<pid>r<i>, table inet soak_<pid>), so a later run can
delete what a killed run left behind (sweep_stale), and close() deletes everything, also
after a failure (the harness closes it at exit and from its watchdog).

Processes: SIGSTOP/SIGCONT of a replica, of the Kafka mock, of every PostgreSQL process.
PostgreSQL read-only: ALTER SYSTEM SET default_transaction_read_only + reload (new and
existing sessions see it; the soak's own psql sets it off for itself).
"""
import os
import re
import signal
import subprocess
import sys

RUN_NETNS = "/run/netns"


class SetupError(RuntimeError):
    """The soak cannot build its network (no netns, nft or privileges): it fails loudly."""


def _run(argv, check=True, input=None):
    r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_stale():
    """Deletes netns and nft tables left by soak runs whose process is gone."""
    try:
        names = os.listdir(RUN_NETNS)
    except OSError:
        names = []
    for name in names:
        m = re.fullmatch(r"soak(\d+)r\d+", name)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "netns", "del", name], check=False)
    r = _run(["nft", "list", "tables"], check=False)
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"table inet (soak_(\d+))", line.strip())
        if m and not _pid_alive(int(m.group(2))):
            _run(["nft", "delete", "table", "inet", m.group(1)], check=False)


def _free_subnet():
    """A 10.X.0.0/16 that no interface of the host uses."""
    used = _run(["ip", "-4", "-o", "addr"], check=False).stdout
    base = 100 + os.getpid() % 100
    for k in range(100):
        x = 100 + (base - 100 + k) % 150
        if f" 10.{x}." not in used:
            return x
    raise SetupError("no free 10.X.0.0/16 subnet for the soak's veth pairs")


class Net:
    """Namespaces, veth pairs and the run's nft table. .ns_path(i), .replica_ip(i),
    .cut(i, peer_ports, mode) -> handle, .heal(handle), .heal_all(), .close()."""

    def __init__(self, replicas):
        if os.geteuid() != 0:
            raise SetupError("the soak needs root for ip netns and nft (run it as root)")
        for tool in ("ip", "nft", "nsenter"):
            if _run(["sh", "-c", f"command -v {tool}"], check=False).returncode != 0:
                raise SetupError(f"the soak needs `{tool}` (iproute2, nftables, util-linux)")
        sweep_stale()
        self.tag = f"soak{os.getpid()}"
        self.table = f"soak_{os.getpid()}"
        self.replicas = replicas
        self.cuts = {}        # handle -> [(chain, rule handle)]
        self.next_cut = 0
        self.ns = []
        self.closed = False
        self.net = _free_subnet()
        try:
            self._build()
        except Exception as e:
            self.close()
            if isinstance(e, SetupError):
                raise
            raise SetupError(f"cannot build the soak's network namespaces: {e}\n"
                             "(needs CAP_SYS_ADMIN/CAP_NET_ADMIN, a writable /run and the "
                             "kernel's netns, veth and nf_tables support)") from e

    def ns_name(self, i):
        return f"{self.tag}r{i}"

    def ns_path(self, i):
        return f"{RUN_NETNS}/{self.ns_name(i)}"

    def host_if(self, i):
        return f"{self.tag}r{i}h"

    def host_ip(self, i):
        return f"10.{self.net}.{i}.1"

    def replica_ip(self, i):
        return f"10.{self.net}.{i}.2"

    def _in_ns(self, i, shell):
        _run(["nsenter", f"--net={self.ns_path(i)}", "sh", "-c", shell])

    def _build(self):
        for i in range(self.replicas):
            ns, h, n = self.ns_name(i), self.host_if(i), f"{self.tag}r{i}n"
            _run(["ip", "netns", "add", ns])
            self.ns.append(ns)
            _run(["ip", "link", "add", h, "type", "veth", "peer", "name", n])
            _run(["ip", "link", "set", n, "netns", ns])
            _run(["ip", "addr", "add", f"{self.host_ip(i)}/30", "dev", h])
            _run(["ip", "link", "set", h, "up"])
            with open(f"/proc/sys/net/ipv4/conf/{h}/route_localnet", "w") as f:
                f.write("1")
            _run(["ip", "-n", ns, "addr", "add", f"{self.replica_ip(i)}/30", "dev", n])
            _run(["ip", "-n", ns, "link", "set", n, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # 127.0.0.0/8 leaves through the veth: the host's loopback servers, one path.
            _run(["ip", "-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo"])
            self._in_ns(i, "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet; "
                           f"echo 1 > /proc/sys/net/ipv4/conf/{n}/route_localnet")
            _run(["ip", "-n", ns, "route", "add", "127.0.0.0/8", "via", self.host_ip(i),
                  "dev", n, "src", self.replica_ip(i)])
        _run(["nft", "-f", "-"], input=(
            f"table inet {self.table} {{\n"
            "  chain input { type filter hook input priority -10; policy accept; }\n"
            "  chain output { type filter hook output priority -10; policy accept; }\n"
            "}\n"))

    def _add_rule(self, chain, rule):
        r = _run(["nft", "--echo", "--handle", "add", "rule", "inet", self.table, chain] + rule)
        m = re.search(r"# handle (\d+)", r.stdout)
        if not m:
            raise RuntimeError(f"nft did not echo a rule handle: {r.stdout!r}")
        return chain, m.group(1)

    def cut(self, i, ports, mode="drop"):
        """Cuts replica i off the given TCP ports of the host (both directions)."""
        ports_set = "{ " + ", ".join(str(p) for p in ports) + " }"
        h = self.host_if(i)
        if mode == "reject":
            verdict = ["reject", "with", "tcp", "reset"]
        else:
            verdict = ["drop"]
        rules = [self._add_rule("input", ["iifname", h, "tcp", "dport", ports_set] + verdict),
                 self._add_rule("output", ["oifname", h, "tcp", "sport", ports_set] + verdict)]
        self.next_cut += 1
        self.cuts[self.next_cut] = rules
        return self.next_cut

    def heal(self, handle):
        for chain, rh in self.cuts.pop(handle, []):
            _run(["nft", "delete", "rule", "inet", self.table, chain, "handle", rh], check=False)

    def heal_all(self):
        for handle in list(self.cuts):
            self.heal(handle)

    def close(self):
        if self.closed:
            return
        self.closed = True
        _run(["nft", "delete", "table", "inet", self.table], check=False)
        for i, ns in enumerate(self.ns):
            _run(["ip", "netns", "del", ns], check=False)
            _run(["ip", "link", "del", self.host_if(i)], check=False)

    def __repr__(self):
        return f"Net({self.tag}, table inet {self.table})"


# --------------------------------------------------------------------------- processes

def pg_pids(pg):
    """The postmaster of a harness Pg and all its children."""
    try:
        with open(os.path.join(pg.data, "postmaster.pid")) as f:
            master = int(f.readline())
    except (OSError, ValueError):
        return []
    pids = [master]
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == master:
            pids.append(int(d))
    return pids


def signal_pids(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def pg_set_read_only(pg, on):
    """ALTER SYSTEM SET default_transaction_read_only and reload: every session, existing
    ones too, turns read-only (or back). This psql session itself stays writable."""
    value = "on" if on else "off"
    env = dict(os.environ, PGOPTIONS="-c default_transaction_read_only=off")
    for sql in (f"ALTER SYSTEM SET default_transaction_read_only = {value}",
                "SELECT pg_reload_conf()"):
        r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", pg.dir, "-p",
                            str(pg.port), "-U", "postgres", "-d", "postgres", "-c", sql],
                           capture_output=True, text=True, env=env, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"read-only {value}: {r.stderr.strip()}")


def pg_allow_tcp(pg, net_prefix):
    """Lets the replicas' veth addresses in (trust, like the harness's own local lines)."""
    with open(os.path.join(pg.data, "pg_hba.conf"), "a") as f:
        f.write(f"host all all {net_prefix} trust\n")
    pg.execute("SELECT pg_reload_conf()")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


SIGNALS = {"stop": signal.SIGSTOP, "cont": signal.SIGCONT, "kill": signal.SIGKILL}
