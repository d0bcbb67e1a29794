"""The checks of scripts/deploy_check.sh (run it, not this: it sets up the venv).

Usage: deploy_check.py [--no-build] [--only kubernetes,compose,docker]

Every failure is printed as `FAIL: <what>` with the file it concerns; the exit status is 1 if
any check failed. Processes it starts listen on 127.0.0.1 only and are stopped before it exits.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import dockerfile
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Kubernetes versions the manifests must be valid for: the oldest the README promises (the
# preStop `sleep` action is on by default from 1.30) and the newest kubernetes-validate has.
K8S_VERSIONS = ["1.30", kv_utils.latest_version()]
# The binaries of the image; anything else a manifest or compose.yaml runs must be one of
# these or a tool of the base image.
RELAYMESH_BINARIES = {"coordinator", "commserver", "simulation", "meshctl"}
BASE_IMAGE_TOOLS = {"bash", "sh"}
# The config keys that bound how long each service takes to stop after SIGTERM, with their
# defaults (coordinator/src/config.rs, commserver/src/config.rs): a coordinator stops within
# shutdown_grace_ms; a comm server first drains for up to drain_on_shutdown_ms, then stops
# within shutdown_grace_ms.
SHUTDOWN_KEYS = {
    "coordinator": {"shutdown_grace_ms": 5000},
    "commserver": {"drain_on_shutdown_ms": 10000, "shutdown_grace_ms": 5000},
}


def shutdown_budget(binary, config):
    """(milliseconds, "what they are") a service may take to stop, from its config."""
    keys = SHUTDOWN_KEYS[binary]
    values = {k: (config or {}).get(k, default) for k, default in keys.items()}
    return sum(values.values()), " + ".join(f"{k} {v} ms" for k, v in values.items())
# glibc of the Debian releases the runtime stage may be based on.
GLIBC = {"bookworm": (2, 36), "trixie": (2, 41)}
DISTROLESS_DEBIAN = {"12": "bookworm", "13": "trixie"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}", flush=True)


def ok(msg):
    print(f"  ok: {msg}", flush=True)


def section(title):
    print(f"\n== {title}", flush=True)


def rel(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# (a) Kubernetes


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def validate_k8s_doc(doc, where):
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            fail(f"{where}: {doc['kind']} {doc['metadata'].get('name')} is not valid for "
                 f"Kubernetes {version} (strict): {e.message} at {path or '/'}")
            return
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{where}: no schema for {doc.get('kind')} {doc.get('apiVersion')} in "
                 f"Kubernetes {version}")
            return
    ok(f"{where}: {doc['kind']}/{doc['metadata']['name']} valid for Kubernetes "
       f"{' and '.join(K8S_VERSIONS)}")


def toml_of(configmaps, name, key, where):
    cm = configmaps.get(name)
    if cm is None or key not in cm.get("data", {}):
        fail(f"{where}: ConfigMap {name} has no key {key}")
        return None
    try:
        return tomllib.loads(cm["data"][key])
    except tomllib.TOMLDecodeError as e:
        fail(f"{where}: ConfigMap {name} key {key} is not TOML: {e}")
        return None


def check_containers(w, where, secrets, configmaps):
    spec = w["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        cname = f"{where}: {w['kind']} {w['metadata']['name']} container {c['name']}"
        env_names = {e["name"] for e in c.get("env", [])}
        # Kubernetes leaves an unknown $(VAR) as it is, silently: catch it here.
        for arg in c.get("command", []) + c.get("args", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                if var not in env_names:
                    fail(f"{cname}: {arg!r} uses $({var}), which no env entry defines")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in secrets.get(ref["name"], set()):
                fail(f"{cname}: env {e['name']} wants key {ref['key']} of Secret {ref['name']}, "
                     "which secret.yaml does not have")
        ports = {p["name"] for p in c.get("ports", []) if "name" in p}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                fail(f"{cname}: {probe} uses port {port!r}, which the container does not name")
        command = c.get("command") or []
        image = c.get("image", "")
        if image == "relaymesh":
            if not command or command[0] not in RELAYMESH_BINARIES:
                fail(f"{cname}: command {command} is not one of the image's binaries "
                     f"{sorted(RELAYMESH_BINARIES)}")
            for probe in ("readinessProbe", "livenessProbe"):
                if "httpGet" not in c.get(probe, {}):
                    fail(f"{cname}: has no HTTP {probe}")
        # The grace period must cover the preStop hook plus the service's own shutdown grace.
        config = None
        for arg in c.get("args", []):
            if arg.startswith("--config="):
                path = Path(arg.split("=", 1)[1])
                for m in c.get("volumeMounts", []):
                    if path.parent == Path(m["mountPath"]):
                        cm = volumes.get(m["name"], {}).get("configMap")
                        if cm:
                            keys = {i["path"]: i["key"] for i in cm.get("items", [])}
                            key = keys.get(path.name, path.name)
                            config = toml_of(configmaps, cm["name"], key, cname)
                if config is None:
                    fail(f"{cname}: --config {path} is not a file of a mounted ConfigMap")
        if image == "relaymesh":
            grace_ms, what = shutdown_budget(command[0], config)
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            period = spec.get("terminationGracePeriodSeconds", 30)
            if period <= pre_stop + grace_ms / 1000:
                fail(f"{cname}: terminationGracePeriodSeconds {period} is not longer than the "
                     f"preStop sleep ({pre_stop} s) plus {what}: the pod would be killed "
                     "before it finished shutting down")
            else:
                ok(f"{cname}: terminationGracePeriodSeconds {period} > preStop {pre_stop} s + "
                   f"{what}")


def check_kubernetes():
    section("(a) Kubernetes manifests: deploy/kubernetes")
    top = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    optional = sorted(K8S.glob("optional/*.yaml"))
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization.get("resources", [])
    if sorted(listed) != top:
        fail(f"deploy/kubernetes/kustomization.yaml lists {sorted(listed)}, the directory has "
             f"{top}: every manifest beside it must be listed, and only those")
    else:
        ok(f"kustomization.yaml lists exactly the {len(top)} manifests present")
    images = {i["name"] for i in kustomization.get("images", [])}

    docs = []
    for name in top:
        for d in load_docs(K8S / name):
            docs.append((f"deploy/kubernetes/{name}", d))
    for path in optional:
        for d in load_docs(path):
            docs.append((rel(path), d))
    for where, d in docs:
        validate_k8s_doc(d, where)

    # Render the kustomization as kubectl apply -k would, and validate what comes out.
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"kubectl kustomize deploy/kubernetes failed: {r.stderr.strip()}")
        else:
            rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
            for d in rendered:
                validate_k8s_doc(d, "kubectl kustomize deploy/kubernetes")
                ns = d["metadata"].get("namespace")
                if d["kind"] != "Namespace" and ns != kustomization.get("namespace"):
                    fail(f"rendered {d['kind']}/{d['metadata']['name']} is in namespace {ns}")
            ok(f"kubectl kustomize rendered {len(rendered)} resources")
    else:
        print("  note: kubectl not installed: the kustomization was not rendered (its resource "
              "list was checked above)")

    all_docs = [d for _, d in docs]
    secrets = {}
    for d in all_docs:
        if d["kind"] == "Secret":
            secrets[d["metadata"]["name"]] = set(d.get("stringData", {})) | set(d.get("data", {}))
    configmaps = {d["metadata"]["name"]: d for d in all_docs if d["kind"] == "ConfigMap"}
    loads = workloads(all_docs)
    for where, w in [(wh, d) for wh, d in docs if d in loads]:
        check_containers(w, where, secrets, configmaps)
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c["image"] not in images and "/" not in c["image"] and ":" not in c["image"]:
                fail(f"{where}: image {c['image']!r} is not set by kustomization.yaml's images")
    services = {d["metadata"]["name"]: d for d in all_docs if d["kind"] == "Service"}
    for name, s in services.items():
        targets = [w for w in loads if selects(s["spec"].get("selector"), pod_labels(w))]
        if not targets:
            fail(f"Service {name}: its selector matches no workload's pods")
            continue
        names = {p.get("name") for w in targets for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                fail(f"Service {name}: targetPort {p['targetPort']!r} is no container port name")
    for w in loads:
        if w["kind"] == "StatefulSet":
            svc = services.get(w["spec"]["serviceName"])
            if svc is None or svc["spec"].get("clusterIP") != "None":
                fail(f"StatefulSet {w['metadata']['name']}: serviceName "
                     f"{w['spec']['serviceName']} is not a headless Service")
    for d in all_docs:
        if d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"]["matchLabels"]
            if not any(selects(sel, pod_labels(w)) for w in loads):
                fail(f"PodDisruptionBudget {d['metadata']['name']} selects no workload")
        if d["kind"] == "HorizontalPodAutoscaler":
            t = d["spec"]["scaleTargetRef"]
            if not any(w["kind"] == t["kind"] and w["metadata"]["name"] == t["name"]
                       for w in loads):
                fail(f"HorizontalPodAutoscaler {d['metadata']['name']}: no {t['kind']} {t['name']}")
    ok("references between manifests checked (Secret and ConfigMap keys, selectors, ports, "
       "$(VAR)s, grace periods)")


# ---------------------------------------------------------------------------------------------
# (b) Compose


def compose_config_files(compose):
    return {name: ROOT / c["file"] for name, c in compose.get("configs", {}).items() if "file" in c}


def url_host_port(url):
    m = re.match(r"^wss?://([^/:]+):(\d+)", url)
    return (m.group(1), int(m.group(2))) if m else (None, None)


def duration_s(text):
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def check_compose():
    section("(b) compose.yaml")
    venv_bin = Path(sys.executable).parent
    r = subprocess.run([str(venv_bin / "check-jsonschema"), "--builtin-schema",
                        "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"compose.yaml does not validate against the Compose Specification schema:\n"
             f"{r.stdout}{r.stderr}")
    else:
        ok("compose.yaml valid against the Compose Specification schema (check-jsonschema "
           "vendor.compose-spec)")
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    configs = compose_config_files(compose)
    volumes = set(compose.get("volumes") or {})
    for name, path in configs.items():
        if not path.is_file():
            fail(f"compose.yaml: config {name}: {rel(path)} does not exist")
    # Every variable has a default, so `docker compose up` works with an empty environment.
    for var in re.findall(r"\$\{([^}]*)\}", COMPOSE.read_text()):
        if ":-" not in var:
            fail(f"compose.yaml: ${{{var}}} has no default")
    for name, s in services.items():
        where = f"compose.yaml service {name}"
        for dep in s.get("depends_on", {}):
            if dep not in services:
                fail(f"{where}: depends_on {dep}, which is no service")
            elif s["depends_on"][dep].get("condition") == "service_healthy" and \
                    services[dep].get("healthcheck", {}).get("disable"):
                fail(f"{where}: waits for {dep} to be healthy, which has no healthcheck")
        for c in s.get("configs", []):
            if c["source"] not in configs:
                fail(f"{where}: config {c['source']} is not declared")
        for v in s.get("volumes", []):
            source = v.split(":")[0] if isinstance(v, str) else v.get("source")
            if not source.startswith((".", "/")) and source not in volumes:
                fail(f"{where}: volume {source} is not declared")
        for p in s.get("ports", []):
            if not str(p).startswith("127.0.0.1:"):
                fail(f"{where}: port {p} is published beyond 127.0.0.1")
        if s.get("image") != "relaymesh:local":
            continue
        if s.get("build") != ".":
            fail(f"{where}: the relaymesh image must be built from the repository root")
        command = s.get("command") or []
        if not command or command[0] not in RELAYMESH_BINARIES | BASE_IMAGE_TOOLS:
            fail(f"{where}: command {command[:1]} is not a binary of the image")
            continue
        test = s.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD" and test[1] != "relaymesh-healthcheck":
            fail(f"{where}: healthcheck runs {test[1]}, which the image does not have")
        args = command[1:]
        opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        text = " ".join(command)
        # Coordinator URLs (in flags or a script) must name coordinator services and their port.
        for url in re.findall(r"wss?://[^\s,\"']+", text):
            host, port = url_host_port(url)
            target = services.get(host)
            if target is None:
                fail(f"{where}: {url} names no service")
                continue
            listen = dict(zip(target["command"][1::1], target["command"][2::1])).get("--listen", "")
            if not listen.endswith(f":{port}"):
                fail(f"{where}: {url} does not use {host}'s --listen port ({listen})")
        if command[0] == "commserver":
            host, _ = url_host_port(opts.get("--public-url", ""))
            if host != name:
                fail(f"{where}: --public-url {opts.get('--public-url')} is not its own name")
        # The stop grace period must cover the time the service takes to stop.
        config_arg = opts.get("--config")
        conf = None
        if config_arg:
            mounted = {c["target"]: c["source"] for c in s.get("configs", [])}
            if config_arg not in mounted:
                fail(f"{where}: --config {config_arg} is not a mounted config")
            else:
                conf = tomllib.loads(configs[mounted[config_arg]].read_text())
        if command[0] in SHUTDOWN_KEYS:
            grace_ms, what = shutdown_budget(command[0], conf)
            stop = duration_s(s.get("stop_grace_period", "10s"))
            if stop <= grace_ms / 1000:
                fail(f"{where}: stop_grace_period {stop} s is not longer than {what}: Docker "
                     "would kill it before it finished shutting down")
    ok(f"references between {len(services)} services checked (depends_on, configs, volumes, "
       "URLs, ports, grace periods)")


# ---------------------------------------------------------------------------------------------
# (c) Dockerfile


def dockerignore_matcher():
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").lstrip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negate, re.compile(regex + "$")))

    def excluded(path):
        # As Docker: a pattern matching a directory excludes what is below it; the last
        # matching pattern decides.
        parts = Path(path).parts
        result = False
        for negate, regex in rules:
            for n in range(1, len(parts) + 1):
                if regex.match("/".join(parts[:n])):
                    result = not negate
                    break
        return result

    return excluded


def stages():
    out = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd.upper() == "FROM":
            v = cmd.value
            name = v[2] if len(v) == 3 and v[1].upper() == "AS" else None
            out.append({"image": v[0], "name": name, "commands": []})
        elif out:
            out[-1]["commands"].append(cmd)
    return out


def flag(cmd, name):
    for f in cmd.flags:
        if f.startswith(f"--{name}="):
            return f.split("=", 1)[1]
    return None


def debian_release(image):
    m = re.match(r"^(?:docker\.io/)?(?:library/)?debian:(\w+)-slim$", image)
    if m:
        return m.group(1)
    m = re.match(r"^gcr\.io/distroless/cc-debian(\d+)", image)
    if m:
        return DISTROLESS_DEBIAN.get(m.group(1))
    return None


def max_glibc(path):
    objdump = shutil.which("objdump")
    if not objdump:
        return None
    out = subprocess.run([objdump, "-T", str(path)], capture_output=True, text=True).stdout
    found = re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", out)
    versions = [tuple(int(x) for x in v.split(".")) for v in found]
    return max(versions) if versions else None


def run_builder(builder, workdir, build):
    """Runs the builder stage's RUN commands from the repository root; returns success."""
    runs = [c for c in builder["commands"] if c.cmd.upper() == "RUN"]
    cargo = [c for c in runs if not c.json and c.value[0].lstrip().startswith("cargo build")]
    if len(cargo) != 1:
        fail("Dockerfile: the builder stage must have exactly one RUN cargo build ...")
        return False
    value = cargo[0].value[0]
    for needed in ("--release", "--locked"):
        if needed not in shlex.split(value):
            fail(f"Dockerfile: the builder's cargo command lacks {needed}: {value}")
    for c in runs:
        for f in c.flags:
            if f.startswith("--mount=") and f"target={workdir}" in f:
                fail(f"Dockerfile: RUN {f} mounts a cache over {workdir}: what it builds would not "
                     "be in the image for COPY --from to find")
    if not build:
        print("  note: --no-build: the builder's RUN commands were not run")
        return True
    env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    for c in runs:
        argv = list(c.value) if c.json else ["/bin/sh", "-c", c.value[0]]
        shown = c.value[0] if not c.json else json.dumps(c.value)
        print(f"  running the builder's RUN (line {c.start_line}) from the repository root:\n"
              f"    {' '.join(shown.split())}", flush=True)
        start = time.monotonic()
        r = subprocess.run(argv, cwd=ROOT, env=env)
        if r.returncode != 0:
            fail(f"Dockerfile line {c.start_line}: the builder's RUN exited with {r.returncode}")
            return False
        ok(f"line {c.start_line} finished in {time.monotonic() - start:.0f} s")
    return True


class Process:
    """A service started from the image's binaries, listening on 127.0.0.1."""

    def __init__(self, argv, env, log, marker):
        self.log_path = log
        self.log = open(log, "w")
        # In the scratch directory: whatever a process writes by a relative path lands there.
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     cwd=Path(log).parent, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.port = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(marker + r" 127\.0\.0\.1:(\d+)", Path(log).read_text())
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.05)

    def text(self):
        return Path(self.log_path).read_text()

    def stop(self, within):
        """SIGTERM; returns (exit code, seconds) or (None, within) if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=within)
            return code, time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None, within
        finally:
            self.log.close()


def healthcheck(argv, bin_dir, env, port):
    run_env = dict(env, PATH=f"{bin_dir}:{os.environ['PATH']}", RELAYMESH_HEALTH_PORT=str(port))
    return subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=30)


def registered_ids(port):
    """The server ids a coordinator on 127.0.0.1:port lists in /v1/stats."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=5) as r:
        return {s["id"] for s in json.load(r)["servers"]}


def check_processes(label, coordinator_toml, commserver_toml, bin_dir, hc_argv, image_env, tmp):
    """Two coordinators and a comm server registered with both (a comma-separated
    --coordinator, as compose.yaml gives it), from the image's binaries, with these config
    files; the HEALTHCHECK against each kind."""
    secret = "deploy-check-cluster-secret"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMESH_")}
    env.update(RUST_LOG="info", RELAYMESH_CLUSTER_SECRET=secret)
    tag = label.replace(" ", "-")
    started = []  # (binary, Process, config file)
    try:
        coords = []
        for n in (1, 2):
            # Each its own SQLite account store here (the sql store; PostgreSQL in a cluster),
            # named by RELAYMESH_ACCOUNTS_URL as the Secret names the database.
            db = tmp / f"{tag}-accounts-{n}.db"
            coord_env = dict(env, RELAYMESH_ACCOUNTS_URL=f"sqlite://{db}")
            p = Process([f"{bin_dir}/coordinator", "--config", str(coordinator_toml),
                         "--listen", "127.0.0.1:0"], coord_env,
                        f"{tmp}/{tag}-coordinator-{n}.log", "coordinator listening on")
            started.append(("coordinator", p, coordinator_toml))
            if p.port is None:
                fail(f"{label}: a coordinator with {coordinator_toml.name} did not start:\n"
                     f"{p.text()}")
                return
            if not db.exists():
                fail(f"{label}: the coordinator did not open the account store "
                     "RELAYMESH_ACCOUNTS_URL names (the Secret's accounts-url would be ignored)")
            coords.append(p)
        ok(f"{label}: two coordinators started with its config, on 127.0.0.1:"
           f"{coords[0].port} and :{coords[1].port}")
        for p in coords:
            r = healthcheck(hc_argv, bin_dir, image_env, p.port)
            if r.returncode != 0:
                fail(f"the Dockerfile's HEALTHCHECK {hc_argv} failed against the coordinator on "
                     f"127.0.0.1:{p.port}: {r.stdout}{r.stderr}")
            r = healthcheck([hc_argv[0], str(p.port), "/readyz"], bin_dir, image_env, p.port)
            if r.returncode != 0:
                fail(f"{label}: the coordinator on 127.0.0.1:{p.port} is not ready (/readyz): "
                     f"{r.stderr}")
        ok(f"{label}: HEALTHCHECK {hc_argv} and /readyz pass against both coordinators")
        urls = ",".join(f"ws://127.0.0.1:{p.port}" for p in coords)
        server = Process([f"{bin_dir}/commserver", "--config", str(commserver_toml),
                          "--coordinator", urls, "--listen", "127.0.0.1:0", "--id", "check-1"],
                         env, f"{tmp}/{tag}-commserver.log", "comm server listening on")
        started.append(("commserver", server, commserver_toml))
        if server.port is None:
            fail(f"{label}: the comm server with {commserver_toml.name} did not start:\n"
                 f"{server.text()}")
            return
        deadline = time.monotonic() + 20
        missing = ["not ready"]
        while missing and time.monotonic() < deadline:
            r = healthcheck([hc_argv[0], str(server.port), "/readyz"], bin_dir, image_env,
                            server.port)
            missing = [] if r.returncode == 0 else [r.stderr.strip()]
            for p in coords:
                if "check-1" not in registered_ids(p.port):
                    missing.append(f"not registered with the coordinator on :{p.port}")
            if missing:
                time.sleep(0.2)
        if missing:
            fail(f"{label}: after 20 s the comm server (--coordinator {urls}) is "
                 f"{'; '.join(missing)}\n{server.text()}")
        else:
            ok(f"{label}: comm server started with its config, registered with both "
               "coordinators, ready")
        r = healthcheck(hc_argv, bin_dir, image_env, server.port)
        if r.returncode != 0:
            fail(f"the HEALTHCHECK failed against the comm server (RELAYMESH_HEALTH_PORT="
                 f"{server.port}): {r.stderr}")
        else:
            ok(f"{label}: HEALTHCHECK passes against the comm server (RELAYMESH_HEALTH_PORT)")
    finally:
        # The comm server first, then the coordinators.
        for binary, p, conf in reversed(started):
            grace_ms, what = shutdown_budget(binary, tomllib.loads(conf.read_text()))
            code, took = p.stop(grace_ms / 1000 + 5)
            if code is None:
                fail(f"{label}: the {binary} did not exit within {what} + 5 s of SIGTERM")
            elif code != 0 and p.port is not None:
                fail(f"{label}: the {binary} exited with {code} on SIGTERM:\n{p.text()}")
            elif p.port is not None:
                ok(f"{label}: the {binary} exited 0 within {took:.1f} s of SIGTERM")


def check_docker(build):
    section("(c) Dockerfile, as written")
    all_stages = stages()
    final = all_stages[-1]
    copies = [c for c in final["commands"] if c.cmd.upper() == "COPY"]
    builder_names = {flag(c, "from") for c in copies if flag(c, "from")}
    if builder_names != {"builder"}:
        fail(f"Dockerfile: the runtime stage copies from {builder_names}, expected the stage "
             "named builder")
        return
    builder = next((s for s in all_stages if s["name"] == "builder"), None)
    if builder is None:
        fail("Dockerfile: no stage named builder")
        return
    workdirs = [c.value[0] for c in builder["commands"] if c.cmd.upper() == "WORKDIR"]
    context_copies = [c for c in builder["commands"] if c.cmd.upper() == "COPY"]
    if len(workdirs) != 1 or [c.value for c in context_copies] != [(".", ".")]:
        fail("Dockerfile: the builder stage must have one WORKDIR and copy the context into it "
             "with COPY . . (that is what maps its WORKDIR to the repository root here)")
        return
    workdir = workdirs[0].rstrip("/")

    # The builder's toolchain and Debian release, against this machine's and the runtime's.
    m = re.match(r"^(?:docker\.io/)?(?:library/)?rust:(\d+\.\d+\.\d+)-(\w+)$", builder["image"])
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.split()
    release = None
    if not m:
        fail(f"Dockerfile: builder image {builder['image']} is not rust:X.Y.Z-<debian release>")
    else:
        if rustc[1:2] != [m.group(1)]:
            fail(f"Dockerfile: the builder has Rust {m.group(1)}, this machine {' '.join(rustc)}: "
                 "the build here would not be the image's")
        else:
            ok(f"builder {builder['image']} has this machine's toolchain (rustc {m.group(1)})")
        release = m.group(2)
        runtime = debian_release(final["image"])
        if runtime != release:
            fail(f"Dockerfile: the builder is on Debian {release}, the runtime {final['image']} "
                 f"({runtime}): the binaries may need a newer glibc than the runtime has")
        else:
            ok(f"runtime {final['image']} is on the builder's Debian release ({release})")

    if not run_builder(builder, workdir, build):
        return

    tmp = Path(tempfile.mkdtemp(prefix="deploy-check-"))
    try:
        rootfs = tmp / "rootfs"
        excluded = dockerignore_matcher()
        binaries = []
        for c in copies:
            src, dest = c.value[0], c.value[-1]
            target = rootfs / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if flag(c, "from"):
                if src == workdir or src.startswith(workdir + "/"):
                    here = ROOT / src[len(workdir) + 1:]
                    shown = f"{src} (the builder's WORKDIR {workdir} is the repository root here)"
                else:
                    # Outside the WORKDIR: a file of the builder image's own; this machine runs
                    # the same Debian release, so its copy stands in.
                    here = Path(src)
                    shown = f"{src} (a file of the builder image; this machine's copy)"
                if not here.is_file():
                    fail(f"Dockerfile line {c.start_line}: COPY --from=builder {src}: {here} does "
                         "not exist after the builder's commands ran")
                    continue
                ok(f"COPY --from=builder {shown} exists")
                if dest.startswith("/usr/local/bin/"):
                    binaries.append((c, target))
            else:
                here = ROOT / src
                if excluded(src):
                    fail(f"Dockerfile line {c.start_line}: COPY {src}: .dockerignore excludes it")
                if not here.is_file():
                    fail(f"Dockerfile line {c.start_line}: COPY {src}: no such file")
                    continue
                if dest.startswith("/usr/local/bin/") and not (
                        os.access(here, os.X_OK) or flag(c, "chmod")):
                    fail(f"Dockerfile line {c.start_line}: {src} is not executable and has no "
                         "--chmod")
            target.symlink_to(here)
        bin_dir = rootfs / "usr" / "local" / "bin"
        names = {t.name for _, t in binaries}
        if names != RELAYMESH_BINARIES:
            fail(f"Dockerfile: the image gets binaries {sorted(names)}, expected "
                 f"{sorted(RELAYMESH_BINARIES)}")
        for c, target in binaries:
            try:
                r = subprocess.run([str(target), "--version"], capture_output=True, text=True)
            except OSError as e:
                fail(f"{target.name} (from line {c.start_line}) does not run: {e}")
                continue
            if r.returncode != 0 or not re.search(r"\d+\.\d+\.\d+", r.stdout):
                fail(f"{target.name} --version (from line {c.start_line}) failed: "
                     f"{r.stdout}{r.stderr}")
            else:
                size = target.resolve().stat().st_size / 2**20
                ok(f"{target.name} --version: {r.stdout.strip()} ({size:.1f} MiB)")
            glibc = max_glibc(target.resolve())
            if glibc and release in GLIBC and glibc > GLIBC[release]:
                fail(f"{target.name} needs GLIBC_{'.'.join(map(str, glibc))}, more than Debian "
                     f"{release}'s {'.'.join(map(str, GLIBC[release]))}")

        # .dockerignore must keep every file the build read: the binaries' dep-info lists them.
        read = {"Cargo.toml", "Cargo.lock"}
        members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
        read |= {f"{m}/Cargo.toml" for m in members}
        for name in RELAYMESH_BINARIES:
            dep_info = ROOT / "target" / "release" / f"{name}.d"
            if not dep_info.is_file():
                fail(f"{rel(dep_info)} missing: cannot check .dockerignore against the build")
                continue
            for path in dep_info.read_text().split(":", 1)[1].split():
                p = Path(path)
                if p.is_absolute() and ROOT in p.parents:
                    read.add(str(p.relative_to(ROOT)))
        dropped = sorted(p for p in read if excluded(p))
        if dropped:
            fail(f".dockerignore excludes files the build reads: {dropped[:10]}")
        else:
            ok(f".dockerignore keeps all {len(read)} workspace files the build read")

        # The HEALTHCHECK, run as Docker would run it in the image, against real processes.
        hc = [c for c in final["commands"] if c.cmd.upper() == "HEALTHCHECK"]
        if len(hc) != 1 or not hc[0].json or hc[0].value[0] != "CMD":
            fail("Dockerfile: the runtime stage needs one HEALTHCHECK in exec form: CMD [...]")
            return
        hc_argv = list(hc[0].value[1:])
        image_env = {}
        for c in final["commands"]:
            if c.cmd.upper() == "ENV":
                v = list(c.value)
                image_env.update(zip(v[0::2], v[1::2]))
        if not (bin_dir / hc_argv[0]).exists():
            fail(f"HEALTHCHECK runs {hc_argv[0]}, which the image's /usr/local/bin does not have")
            return
        r = healthcheck(hc_argv, bin_dir, image_env, 1)
        if r.returncode == 0:
            fail(f"HEALTHCHECK {hc_argv} passed with nothing listening (port 1): it checks nothing")
        else:
            ok(f"HEALTHCHECK {hc_argv} fails with nothing listening")
        configmap = next(d for d in load_docs(K8S / "configmap.yaml") if d["kind"] == "ConfigMap")
        for key in ("coordinator.toml", "commserver.toml"):
            (tmp / f"k8s-{key}").write_text(configmap["data"][key])
        compose_configs = compose_config_files(yaml.safe_load(COMPOSE.read_text()))
        check_processes("kubernetes ConfigMap", tmp / "k8s-coordinator.toml",
                        tmp / "k8s-commserver.toml", bin_dir, hc_argv, image_env, tmp)
        check_processes("compose configs", compose_configs["coordinator"],
                        compose_configs["commserver"], bin_dir, hc_argv, image_env, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true",
                        help="skip the builder's RUN commands (use the binaries already built)")
    parser.add_argument("--only", default="kubernetes,compose,docker",
                        help="comma-separated: kubernetes, compose, docker")
    args = parser.parse_args()
    only = set(args.only.split(","))
    unknown = only - {"kubernetes", "compose", "docker"}
    if unknown:
        parser.error(f"unknown --only parts: {sorted(unknown)}")
    start = time.monotonic()
    for part, check in (("kubernetes", check_kubernetes), ("compose", check_compose),
                        ("docker", lambda: check_docker(build=not args.no_build))):
        if part not in only:
            continue
        try:
            check()
        except Exception:  # a file too broken for the checks above to handle: say so, go on
            import traceback
            traceback.print_exc()
            fail(f"the {part} checks stopped on an error (traceback above): the files are not "
                 "what they expect")
    took = time.monotonic() - start
    if failures:
        print(f"\ndeploy_check: {len(failures)} FAILED ({took:.0f} s):")
        for f in failures:
            print(f"  - {f.splitlines()[0]}")
        sys.exit(1)
    print(f"\ndeploy_check: all checks passed ({took:.0f} s)")


if __name__ == "__main__":
    main()
