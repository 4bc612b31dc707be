"""The container image and the Kubernetes manifests agree with the code.

Parses Dockerfile and every deploy/k8s/*.yaml and checks them against the real binary:
env names against `ticketd config-table`, ports against the LISTEN default, probe paths
against a running service, the drain budget against SHUTDOWN_GRACE, Job/CronJob commands
against the commands ticketd knows, the runtime package list against the libraries the
binary links, and the Dockerfile's HEALTHCHECK is executed against a running service.
deploy/haproxy.cfg passes `haproxy -c` with its variables set and keeps the rules
deploy/README.md states (it runs for real in test_rolling_update.py).
"""
import glob
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import yaml  # Debian's python3-yaml  # noqa: E402

K8S_DIR = os.path.join(harness.SOURCE_DIR, "deploy", "k8s")
DOCKERFILE = os.path.join(harness.SOURCE_DIR, "Dockerfile")
HAPROXY_CFG = os.path.join(harness.SOURCE_DIR, "deploy", "haproxy.cfg")
PACKAGE_SCRIPT = os.path.join(harness.SOURCE_DIR, "deps", "install-packages.sh")

REQUIRED_KINDS = {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
                  "HorizontalPodAutoscaler", "Job", "CronJob"}
SECRET_ENVS = {"ADMIN_TOKEN", "DATABASE_URL", "KAFKA_CONFIG"}


# --------------------------------------------------------------------------- helpers

def load_manifests():
    """[(file name, document)] for every YAML document under deploy/k8s."""
    docs = []
    for path in sorted(glob.glob(os.path.join(K8S_DIR, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((os.path.basename(path), doc))
    return docs


def config_table():
    """{ENV: default} parsed from `ticketd config-table` (Markdown)."""
    r = harness.run_ticketd(["config-table"], timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"ticketd config-table exited {r.returncode}: {r.stderr}")
    table = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        env = cells[0].strip("`")
        default = cells[2]
        default = "" if default == "(empty)" else default.strip("`")
        table[env] = default
    if not table:
        raise AssertionError(f"no settings parsed from config-table output:\n{r.stdout}")
    return table


def parse_duration_ms(text):
    """The config table's duration syntax: ms, s, m, h, d suffixes; a bare number is ms."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", text.strip())
    if not m:
        raise AssertionError(f"not a duration: {text!r}")
    scale = {None: 1, "ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}[m.group(2)]
    return int(m.group(1)) * scale


def pod_specs(docs):
    """[(kind/name, pod spec)] of every workload (Deployment, Job, CronJob...)."""
    out = []
    for _, d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        spec = d.get("spec") or {}
        if kind == "CronJob":
            tmpl = spec["jobTemplate"]["spec"]["template"]
        elif "template" in spec:
            tmpl = spec["template"]
        else:
            continue
        out.append((f"{kind}/{name}", tmpl))
    return out


def containers(pod_template):
    spec = pod_template["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def parse_dockerfile(path=DOCKERFILE):
    """[(instruction, argument text)] with line continuations joined and comments dropped."""
    with open(path, encoding="utf-8") as f:
        raw = f.read().splitlines()
    instructions, buf = [], ""
    for line in raw:
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by docker too
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        buf = ""
    return instructions


def dockerfile_stages(instructions):
    """[[(instruction, arg)]] one list per FROM."""
    stages = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def help_commands():
    """Command names listed under "commands:" in `ticketd help` (or --help)."""
    for argv in (["help"], ["--help"]):
        r = harness.run_ticketd(argv, timeout=30)
        text = r.stdout + r.stderr
        if "commands:" in text:
            break
    names, inside = set(), False
    for line in text.splitlines():
        if line.strip().lower().startswith("commands:"):
            inside = True
            continue
        if inside:
            if not line.strip():
                break
            m = re.match(r"\s+([a-z][a-z-]*)", line)
            if m:
                names.add(m.group(1))
    return names


# --------------------------------------------------------------------------- tests

class ManifestFiles(unittest.TestCase):
    """Static checks: no service needed."""

    @classmethod
    def setUpClass(cls):
        cls.docs = load_manifests()
        cls.table = config_table()
        cls.by_kind = {}
        for fname, d in cls.docs:
            cls.by_kind.setdefault(d["kind"], []).append(d)
        cls.deployment = cls.by_kind["Deployment"][0]
        cls.pod = cls.deployment["spec"]["template"]
        cls.main = cls.pod["spec"]["containers"][0]

    def test_every_manifest_parses_and_every_kind_is_there(self):
        files = glob.glob(os.path.join(K8S_DIR, "*.yaml"))
        self.assertGreaterEqual(len(files), 8, files)
        for fname, d in self.docs:
            with self.subTest(file=fname):
                self.assertIsInstance(d, dict)
                for key in ("apiVersion", "kind", "metadata"):
                    self.assertIn(key, d)
                self.assertTrue(d["metadata"].get("name"))
        self.assertEqual(REQUIRED_KINDS - set(self.by_kind), set(), "missing kinds")

    def test_env_names_are_settings_of_the_config_table(self):
        names = {}
        for d in self.by_kind["ConfigMap"]:
            for k in (d.get("data") or {}):
                names[k] = f"ConfigMap/{d['metadata']['name']}"
        for d in self.by_kind["Secret"]:
            for k in list((d.get("stringData") or {})) + list((d.get("data") or {})):
                names[k] = f"Secret/{d['metadata']['name']}"
        for where, tmpl in pod_specs(self.docs):
            for c in containers(tmpl):
                for e in c.get("env") or []:
                    names[e["name"]] = f"{where} container {c['name']}"
        self.assertTrue(names)
        unknown = {n: w for n, w in names.items() if n not in self.table}
        self.assertEqual(unknown, {}, f"env names not in `ticketd config-table`: {unknown}")

    def test_secrets_are_in_the_secret_not_the_configmap(self):
        secret_keys = set()
        for d in self.by_kind["Secret"]:
            secret_keys |= set(d.get("stringData") or {}) | set(d.get("data") or {})
        self.assertEqual(SECRET_ENVS - secret_keys, set())
        for d in self.by_kind["ConfigMap"]:
            self.assertEqual(SECRET_ENVS & set(d.get("data") or {}), set())

    def test_configmap_and_secret_values_are_accepted_by_ticketd(self):
        env = {}
        for d in self.by_kind["ConfigMap"]:
            env.update({k: str(v) for k, v in (d.get("data") or {}).items()})
        for d in self.by_kind["Secret"]:
            env.update({k: str(v) for k, v in (d.get("stringData") or {}).items()})
        # cfg_load reads the environment before the flags, so a bad value fails before
        # --help prints and exits.
        r = harness.run_ticketd(["serve", "--help"], env=env, timeout=30)
        self.assertNotIn("invalid value", r.stderr)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_every_workload_reads_the_configmap_and_the_secret(self):
        cm = self.by_kind["ConfigMap"][0]["metadata"]["name"]
        secret = self.by_kind["Secret"][0]["metadata"]["name"]
        for where, tmpl in pod_specs(self.docs):
            for c in tmpl["spec"]["containers"]:
                with self.subTest(workload=where):
                    refs = c.get("envFrom") or []
                    self.assertIn(cm, [r.get("configMapRef", {}).get("name") for r in refs])
                    self.assertIn(secret, [r.get("secretRef", {}).get("name") for r in refs])

    def _container_port(self, ref):
        for p in self.main.get("ports") or []:
            if ref in (p.get("name"), p.get("containerPort")):
                return p["containerPort"]
        self.fail(f"port {ref!r} is not a port of the ticketd container")

    def test_ports_match_the_listen_setting(self):
        default_port = int(self.table["LISTEN"].rsplit(":", 1)[1])
        self.assertEqual([p["containerPort"] for p in self.main["ports"]], [default_port])
        for d in self.by_kind["ConfigMap"]:
            listen = (d.get("data") or {}).get("LISTEN")
            if listen is not None:
                self.assertEqual(int(listen.rsplit(":", 1)[1]), default_port)
                self.assertFalse(listen.startswith("127."), "must listen beyond loopback in a pod")
        for svc in self.by_kind["Service"]:
            for p in svc["spec"]["ports"]:
                self.assertEqual(self._container_port(p["targetPort"]), default_port)
        ann = self.pod["metadata"].get("annotations") or {}
        if "prometheus.io/port" in ann:
            self.assertEqual(int(ann["prometheus.io/port"]), default_port)
        expose = [a for i, a in parse_dockerfile() if i == "EXPOSE"]
        self.assertEqual(expose, [str(default_port)])

    def test_probes(self):
        ready = self.main["readinessProbe"]["httpGet"]
        live = self.main["livenessProbe"]["httpGet"]
        self.assertEqual(ready["path"], "/readyz")
        self.assertEqual(live["path"], "/healthz")
        default_port = int(self.table["LISTEN"].rsplit(":", 1)[1])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in self.main:
                self.assertEqual(self._container_port(self.main[probe]["httpGet"]["port"]),
                                 default_port)

    def test_grace_period_covers_prestop_and_shutdown_grace(self):
        grace_ms = parse_duration_ms(self.table["SHUTDOWN_GRACE"])
        for d in self.by_kind["ConfigMap"]:
            if "SHUTDOWN_GRACE" in (d.get("data") or {}):
                grace_ms = parse_duration_ms(str(d["data"]["SHUTDOWN_GRACE"]))
        pre = self.main["lifecycle"]["preStop"]
        if "sleep" in pre:
            prestop_s = int(pre["sleep"]["seconds"])
        else:
            cmd = pre["exec"]["command"]
            self.assertEqual(cmd[0], "sleep", cmd)
            prestop_s = int(cmd[1])
        self.assertGreater(prestop_s, 0, "preStop must give the load balancer time")
        period = self.pod["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(period * 1000, prestop_s * 1000 + grace_ms,
                           f"terminationGracePeriodSeconds {period} <= preStop {prestop_s}s "
                           f"+ SHUTDOWN_GRACE {grace_ms}ms: the kubelet would SIGKILL mid-drain")
        # The readiness probe must notice the drain well within the grace period.
        rp = self.main["readinessProbe"]
        self.assertLess(rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3) * 1000,
                        grace_ms)

    def test_deployment_shape(self):
        spec = self.deployment["spec"]
        self.assertGreaterEqual(spec["replicas"], 3)
        self.assertEqual(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0)
        pod_labels = self.pod["metadata"]["labels"]
        sel = spec["selector"]["matchLabels"]
        self.assertLessEqual(sel.items(), pod_labels.items())
        for c in self.pod["spec"]["containers"]:
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    self.assertIn(res, c["resources"][kind], f"{c['name']} {kind}.{res}")
        sc = self.pod["spec"].get("securityContext") or {}
        self.assertTrue(sc.get("runAsNonRoot"))
        self.assertNotEqual(sc.get("runAsUser", 0), 0)

    def test_service_pdb_and_hpa_select_the_deployment(self):
        pod_labels = self.pod["metadata"]["labels"]
        for svc in self.by_kind["Service"]:
            self.assertLessEqual(svc["spec"]["selector"].items(), pod_labels.items())
        for pdb in self.by_kind["PodDisruptionBudget"]:
            self.assertLessEqual(pdb["spec"]["selector"]["matchLabels"].items(), pod_labels.items())
            if "minAvailable" in pdb["spec"]:
                self.assertLess(pdb["spec"]["minAvailable"], self.deployment["spec"]["replicas"])
        for hpa in self.by_kind["HorizontalPodAutoscaler"]:
            ref = hpa["spec"]["scaleTargetRef"]
            self.assertEqual((ref["kind"], ref["name"]),
                             ("Deployment", self.deployment["metadata"]["name"]))
            self.assertGreaterEqual(hpa["spec"]["minReplicas"], 2)
            self.assertGreaterEqual(hpa["spec"]["maxReplicas"], hpa["spec"]["minReplicas"])
        # Job and CronJob pods must not receive Service traffic.
        svc_sel = self.by_kind["Service"][0]["spec"]["selector"]
        for where, tmpl in pod_specs(self.docs):
            if where.startswith(("Job/", "CronJob/")):
                labels = tmpl["metadata"].get("labels") or {}
                self.assertFalse(svc_sel.items() <= labels.items(), where)

    def test_job_and_cronjob_run_real_ticketd_commands(self):
        known = help_commands()
        expected = {"Job": "migrate", "CronJob": "audit"}
        for where, tmpl in pod_specs(self.docs):
            kind = where.split("/")[0]
            for c in tmpl["spec"]["containers"]:
                argv = list(c.get("command") or []) + list(c.get("args") or [])
                if c.get("command"):
                    self.assertEqual(os.path.basename(argv[0]), "ticketd", where)
                    argv = argv[1:]
                self.assertTrue(argv, f"{where}: no command given (CMD would run serve)")
                cmd = argv[0]
                if kind in expected:
                    self.assertEqual(cmd, expected[kind], where)
                with self.subTest(workload=where, command=cmd):
                    if cmd in known:
                        continue
                    # Not in the help text: accept it if the binary knows it.
                    r = harness.run_ticketd([cmd, "--help"], timeout=30)
                    self.assertEqual(r.returncode, 0,
                                     f"`ticketd {cmd}` is neither in `ticketd help` "
                                     f"({sorted(known)}) nor accepted: {r.stderr.strip()}")
                    self.assertNotIn("unknown command", (r.stdout + r.stderr).lower())


class DockerfileChecks(unittest.TestCase):
    """The image cannot be built here (no container engine): check it by construction."""

    @classmethod
    def setUpClass(cls):
        cls.ins = parse_dockerfile()
        cls.stages = dockerfile_stages(cls.ins)

    def test_stages_use_debian_12_slim_and_the_package_script(self):
        self.assertGreaterEqual(len(self.stages), 2, "multi-stage")
        for stage in self.stages:
            self.assertTrue(stage[0][1].split()[0] == "debian:12-slim", stage[0])
            runs = " ".join(a for i, a in stage if i == "RUN")
            self.assertIn("install-packages.sh", runs, "every stage installs with the script")
        build, final = self.stages[0], self.stages[-1]
        self.assertIn("install-packages.sh --build", " ".join(a for i, a in build if i == "RUN"))
        self.assertIn("install-packages.sh --runtime", " ".join(a for i, a in final if i == "RUN"))
        build_runs = " ".join(a for i, a in build if i == "RUN")
        self.assertRegex(build_runs, r"cmake -S \S+ -B \S+")
        self.assertRegex(build_runs, r"cmake --build")
        # Built with the configuration test/run tests (its release stage, build/).
        run_script = os.path.join(harness.SOURCE_DIR, "test", "run")
        if os.path.exists(run_script):
            with open(run_script, encoding="utf-8") as f:
                script = f.read()
            configure = [ln for ln in script.splitlines() if re.search(r"\bcmake -S ", ln)]
            self.assertTrue(configure, "test/run: no cmake -S line")
            flags = [f.strip('"') for ln in configure for f in re.findall(r"-D[A-Z_]+=\S+", ln)]
            m = re.search(r"^\s*if configure_build build (.*?); then", script, re.M)
            self.assertIsNotNone(m, "test/run: release stage not found")
            flags += re.findall(r"-D[A-Z_]+=\S+", m.group(1))
            self.assertTrue(flags)
            for flag in flags:
                self.assertIn(flag, build_runs, "Dockerfile build differs from test/run")
        # The final stage compiles nothing and copies only the binary from the build stage.
        final_runs = " ".join(a for i, a in final if i == "RUN")
        self.assertNotIn("cmake", final_runs)
        copies = [a for i, a in final if i == "COPY" and a.startswith("--from=")]
        self.assertEqual(len(copies), 1, copies)
        self.assertIn("/ticketd", copies[0])

    def test_final_stage_runs_ticketd_serve_as_non_root(self):
        final = self.stages[-1]
        user = [a for i, a in final if i == "USER"]
        self.assertTrue(user, "USER missing")
        self.assertNotIn(user[-1].split(":")[0], ("root", "0"))
        self.assertTrue(user[-1].split(":")[0].isdigit(), "numeric USER for runAsNonRoot")
        self.assertEqual([json.loads(a) for i, a in final if i == "ENTRYPOINT"], [["ticketd"]])
        self.assertEqual([json.loads(a) for i, a in final if i == "CMD"], [["serve"]])
        self.assertIn("/healthz", " ".join(a for i, a in final if i == "HEALTHCHECK"))

    def test_runtime_packages_cover_the_libraries_the_binary_links(self):
        with open(PACKAGE_SCRIPT, encoding="utf-8") as f:
            m = re.search(r"runtime_pkgs=\(([^)]*)\)", f.read())
        self.assertIsNotNone(m, "deps/install-packages.sh has no runtime_pkgs list")
        runtime = set(m.group(1).split())
        r = subprocess.run(["readelf", "-d", harness.BIN], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)
        self.assertTrue(needed)
        ldd = subprocess.run(["ldd", harness.BIN], capture_output=True, text=True, timeout=30)
        paths = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd.stdout, re.M))
        base = {"libc6", "libgcc-s1"}  # in every Debian image
        missing = {}
        for lib in needed:
            if re.match(r"lib(asan|ubsan|lsan|tsan)\.", lib):
                continue  # a sanitizer build
            path = paths.get(lib)
            self.assertIsNotNone(path, f"ldd did not resolve {lib}")
            q = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True,
                               text=True, timeout=30)
            if q.returncode != 0:
                q = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True,
                                   timeout=30)
            self.assertEqual(q.returncode, 0, f"no package owns {path}")
            pkg = q.stdout.split(":", 1)[0]
            if pkg not in runtime | base:
                missing[lib] = pkg
        self.assertEqual(missing, {}, "libraries linked but not in install-packages.sh --runtime")


@unittest.skipUnless(subprocess.run(["sh", "-c", "command -v haproxy"]).returncode == 0,
                     "haproxy not installed")
class HaproxyConfig(unittest.TestCase):
    """The reference load-balancer configuration: valid, and the rules the README states."""

    def setUp(self):
        with open(HAPROXY_CFG, encoding="utf-8") as f:
            self.lines = [line.split("#", 1)[0].strip() for line in f]
        self.directives = [line for line in self.lines if line]

    def directive(self, name):
        found = [d for d in self.directives if d == name or d.startswith(name + " ")]
        self.assertTrue(found, f"no {name!r} in deploy/haproxy.cfg")
        return found[-1][len(name):].strip()

    def test_haproxy_accepts_it_with_its_variables_set(self):
        env = dict(os.environ, TICKETD_LB_BIND="127.0.0.1:8080", TICKETD_LB_STATS_BIND="127.0.0.1:8404",
                   TICKETD_LB_SOCKET="/tmp/ticketd-haproxy-check.sock",
                   **{f"TICKETD_REPLICA_{i}": f"127.0.0.1:{8080 + i}" for i in (1, 2, 3)})
        r = subprocess.run(["haproxy", "-c", "-f", HAPROXY_CFG], env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertNotIn("[WARNING]", r.stdout + r.stderr)
        servers = [d for d in self.directives if d.startswith("server ")]
        self.assertEqual(len(servers), 3)
        self.assertTrue(all('"${TICKETD_REPLICA_' in d for d in servers), servers)

    def test_health_check_is_readyz_and_retries_never_replay_a_slow_answer(self):
        self.assertIn("uri /readyz", self.directive("http-check send"))
        self.assertEqual(self.directive("http-check expect"), "status 200")
        retry_on = self.directive("retry-on").split()
        self.assertIn("conn-failure", retry_on)
        for unsafe in ("response-timeout", "all-retryable-errors", "junk-response"):
            self.assertNotIn(unsafe, retry_on, "a slow or odd answer may be a committed application")
        self.assertTrue(self.directive("option redispatch").startswith("1"))
        self.assertIn("Retry-After 1", self.directive("http-error"))

    def test_timeouts_cover_the_drain_and_match_ticketd(self):
        table = config_table()
        grace_ms = parse_duration_ms(table["SHUTDOWN_GRACE"])
        self.assertGreater(parse_duration_ms(self.directive("timeout server")), grace_ms)
        self.assertEqual(parse_duration_ms(self.directive("timeout http-request")),
                         parse_duration_ms(table["HEADER_TIMEOUT"]))
        self.assertIn("maxconn", self.directive("default-server"))
        self.directive("timeout queue")


class ProbesAgainstTheService(harness.TicketdTestCase):
    """The probe paths exist in the API, and the Dockerfile's HEALTHCHECK command works."""

    def healthcheck_argv(self):
        hc = [a for i, a in dockerfile_stages(parse_dockerfile())[-1] if i == "HEALTHCHECK"]
        self.assertEqual(len(hc), 1)
        m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc[0])
        self.assertIsNotNone(m, "HEALTHCHECK must use the exec form CMD [...]")
        return json.loads(m.group(1))

    def test_probe_paths_answer_and_the_healthcheck_passes(self):
        t = self.track(harness.Ticketd(self.pg))
        docs = load_manifests()
        dep = [d for _, d in docs if d["kind"] == "Deployment"][0]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            path = c[probe]["httpGet"]["path"]
            r = t.request("GET", path)
            self.assertEqual(r.status, 200, f"{probe} {path}: {r!r}")

        argv = self.healthcheck_argv()
        env = dict(os.environ, LISTEN=f"0.0.0.0:{t.port}")
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
        self.assertEqual(r.returncode, 0, f"HEALTHCHECK failed against a live service: {r.stderr}")

        # ...and fails when nothing listens there, or when /healthz is not 200.
        env = dict(os.environ, LISTEN=f"0.0.0.0:{harness.free_port()}")
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
        self.assertNotEqual(r.returncode, 0, "HEALTHCHECK passed with nothing listening")

        class Unhealthy(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        srv = http.server.HTTPServer(("127.0.0.1", 0), Unhealthy)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            env = dict(os.environ, LISTEN=f"0.0.0.0:{srv.server_address[1]}")
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
            self.assertNotEqual(r.returncode, 0, "HEALTHCHECK passed on a 503")
        finally:
            srv.shutdown()
            srv.server_close()


if __name__ == "__main__":
    unittest.main()
