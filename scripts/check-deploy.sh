#!/usr/bin/env bash
# Checks the deployment examples in examples/deploy/ (run by .ci/run):
#   - compose/compose.yaml against the Compose Specification's schema, with dclint (npm), which
#     bundles that schema, plus dclint's rules (e.g. ports published without an interface);
#   - kubernetes/*.yaml against the Kubernetes API schemas of 1.30 and 1.37, strictly (unknown
#     fields are errors), with kubernetes-validate (PyPI), which bundles them: no network needed
#     once it is installed;
#   - compose/nats.conf with `nats-server -t`;
#   - every meshgate config in them (the file compose mounts, the ConfigMap's meshgate.toml) with
#     `meshgate validate`, in the environment each container gets (MESHGATE__... variables);
#   - that the pieces agree: mounted files exist, depends_on and volumes name what is defined, the
#     NATS routes and meshgate's NATS URLs name the three NATS services, each NATS node has its
#     own server_name and store volume, ports and probes name the ports meshgate listens on, the
#     Services select the Deployment's pods, the ConfigMap is the file meshgate is started with.
# Fails on the first problem, saying which file and what.
#
# The validators are installed, pinned, into $MESHGATE_DEPLOY_TOOLS (default
# /tmp/meshgate-deploy-tools): kubernetes-validate in a venv there (pip; nothing is installed
# into the system's Python), dclint with npm --prefix there. Neither needs root. Debian packages
# (python3-venv, nodejs + npm, nats-server) are installed with apt-get when run as root and
# missing; otherwise the script says what to install. meshgate is $MESHGATE_BIN, else
# ${CARGO_TARGET_DIR:-target}/debug/meshgate built with `cargo build --bin meshgate` (the build scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
DCLINT_VERSION=3.1.0
KUBERNETES_VERSIONS=(1.30.0 1.37.0)
TOOLS=${MESHGATE_DEPLOY_TOOLS:-/tmp/meshgate-deploy-tools}
DEPLOY=examples/deploy

say() { echo "check-deploy: $*"; }
fail() { echo "check-deploy: FAILED: $*" >&2; exit 1; }

apt_install() { # package...: as root, or fail saying what to install
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing $*"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "$@" >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null; }
    else
        fail "missing $*; install with: sudo apt-get install -y $*"
    fi
}

# --- tools -----------------------------------------------------------------------------------
command -v python3 >/dev/null || apt_install python3 python3-venv
command -v nats-server >/dev/null || apt_install nats-server
command -v npm >/dev/null || apt_install nodejs npm
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)' ||
    fail "dclint needs Node.js 20.19 or newer; this is $(node --version)"

KV=$TOOLS/venv/bin/kubernetes-validate
if [ "$("$KV" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $TOOLS/venv"
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$TOOLS/venv"; }
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
PY=$TOOLS/venv/bin/python # has PyYAML (a kubernetes-validate dependency) and tomllib

DCLINT=$TOOLS/node/node_modules/.bin/dclint
if [ "$("$DCLINT" --version 2>/dev/null)" != "$DCLINT_VERSION" ]; then
    say "installing dclint $DCLINT_VERSION into $TOOLS/node"
    mkdir -p "$TOOLS/node"
    npm install --prefix "$TOOLS/node" --no-audit --no-fund --silent "dclint@$DCLINT_VERSION"
fi

if [ -n "${MESHGATE_BIN:-}" ]; then
    MESHGATE=$MESHGATE_BIN
else
    cargo build --quiet --bin meshgate
    MESHGATE=${CARGO_TARGET_DIR:-target}/debug/meshgate
fi
say "kubernetes-validate $("$KV" --version), dclint $("$DCLINT" --version)," \
    "$(nats-server --version), $("$MESHGATE" --version)"

# --- compose ---------------------------------------------------------------------------------
say "dclint $DEPLOY/compose/compose.yaml"
"$DCLINT" --no-color "$DEPLOY/compose/compose.yaml" ||
    fail "$DEPLOY/compose/compose.yaml: dclint found problems (above)"

# --- kubernetes ------------------------------------------------------------------------------
for v in "${KUBERNETES_VERSIONS[@]}"; do
    say "kubernetes-validate --strict -k $v $DEPLOY/kubernetes/*.yaml"
    # A kind it has no schema for is only a warning there: an error here.
    out=$("$KV" --strict -k "$v" "$DEPLOY"/kubernetes/*.yaml 2>&1) && ! grep -qv '^INFO ' <<<"$out" ||
        { echo "$out" >&2; fail "$DEPLOY/kubernetes: not valid for Kubernetes $v (above)"; }
done

# --- the pieces together, nats.conf, and `meshgate validate` on every config ----------------
say "nats-server -t, meshgate validate and cross-checks"
MESHGATE=$MESHGATE "$PY" - "$DEPLOY" <<'PYTHON'
import os, re, subprocess, sys, tempfile, tomllib
import yaml

deploy, meshgate = sys.argv[1], os.environ["MESHGATE"]

def fail(where, what):
    sys.exit(f"check-deploy: FAILED: {where}: {what}")

def check(ok, where, what):
    if not ok:
        fail(where, what)

def port_of(listen):
    return int(listen.rsplit(":", 1)[1])

def validate(where, text, env):
    """`meshgate validate` on a config's text, with the MESHGATE__ variables a container gets."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE__")}
    r = subprocess.run([meshgate, "validate", "-c", f.name], env={**clean, **env},
                       capture_output=True, text=True)
    os.unlink(f.name)
    check(r.returncode == 0, where, "meshgate validate:\n" + r.stdout + r.stderr)
    print(f"check-deploy: {where}: meshgate validate ok")
    return tomllib.loads(text)

def listens(cfg):
    """Container ports of meshgate's listeners in a (valid) config."""
    ports = {"admin": port_of(cfg["admin"]["listen"]), "http": port_of(cfg["http"]["listen"])}
    if cfg.get("mqtt", {}).get("enabled"):
        ports["mqtt"] = port_of(cfg["mqtt"]["listen"])
    return ports

# compose ---------------------------------------------------------------------------------------
cdir = os.path.join(deploy, "compose")
cfile = os.path.join(cdir, "compose.yaml")
compose = yaml.safe_load(open(cfile))  # resolves the `<<: *anchor` merges
services = compose["services"]
volumes = set(compose.get("volumes") or {})

def interpolate(value):  # ${VAR:-default} as compose does, with the defaults
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), str(value))

def mounts(name, svc):
    out = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            check(os.path.isfile(os.path.join(cdir, src)), f"{cfile}: {name}", f"no file {src}")
        else:
            check(src in volumes, f"{cfile}: {name}", f"volume {src} is not under volumes:")
        out[dst] = src
    return out

for name, svc in services.items():
    mounts(name, svc)
    for dep in svc.get("depends_on", {}):
        check(dep in services, f"{cfile}: {name}", f"depends_on names no service {dep}")
    if "build" in svc:
        ctx = os.path.join(cdir, svc["build"]["context"])
        check(os.path.isfile(os.path.join(ctx, svc["build"].get("dockerfile", "Dockerfile"))),
              f"{cfile}: {name}", "build context has no Dockerfile")

nats = {n: s for n, s in services.items() if s.get("image", "").startswith("nats:")}
check(len(nats) == 3, cfile, f"expected 3 NATS services, found {sorted(nats)}")
names, stores, conf = set(), set(), None
for name, svc in nats.items():
    args = svc["command"]
    check("--server_name" in args, f"{cfile}: {name}", "no --server_name")
    names.add(args[args.index("--server_name") + 1])
    m = mounts(name, svc)
    check("/data" in m and not m["/data"].startswith("."), f"{cfile}: {name}",
          "no volume of its own at /data (the JetStream store)")
    stores.add(m["/data"])
    conf = os.path.normpath(os.path.join(cdir, m[args[args.index("--config") + 1]]))
check(len(names) == 3 and len(stores) == 3, cfile, "NATS nodes need distinct names and volumes")
r = subprocess.run(["nats-server", "-t", "-c", conf], capture_output=True, text=True)
check(r.returncode == 0, conf, "nats-server -t:\n" + r.stdout + r.stderr)
print(f"check-deploy: {conf}: nats-server -t ok")
conf_text = open(conf).read()
check(re.search(r"(?m)^\s*jetstream\s*\{", conf_text) and re.search(r"(?m)^\s*store_dir:\s*\"?/data/",
      conf_text), conf, "no jetstream block storing under /data")
routes = set(re.findall(r"nats-route://([\w.-]+):6222", conf_text))
check(routes == set(nats), conf, f"routes {sorted(routes)} are not the NATS services {sorted(nats)}")

gateways = {n: s for n, s in services.items() if "meshgate" in s.get("image", "")}
check(len(gateways) == 2, cfile, f"expected 2 meshgate services, found {sorted(gateways)}")
ids = set()
for name, svc in gateways.items():
    where = f"{cfile}: {name}"
    args = svc["command"]
    config = mounts(name, svc)[args[args.index("--config") + 1]]
    env = {k: interpolate(v) for k, v in (svc.get("environment") or {}).items()}
    cfg = validate(f"{where} ({config})", open(os.path.join(cdir, config)).read(), env)
    ids.add(env.get("MESHGATE__GATEWAY__INSTANCE_ID"))
    check(cfg["backbone"]["kind"] == "jetstream", where, "backbone.kind is not jetstream")
    urls = {re.match(r"nats://([\w.-]+):4222$", u)[1] for u in cfg["backbone"]["nats"]["urls"]}
    check(urls == set(nats), where, f"backbone.nats.urls {sorted(urls)} are not {sorted(nats)}")
    for dep in list(nats) + (["rabbitmq"] if cfg.get("amqp", {}).get("enabled") else []):
        check(dep in svc.get("depends_on", {}), where, f"does not wait for {dep}")
    published = {int(p.rsplit(":", 1)[1]) for p in svc.get("ports", [])}
    check(set(listens(cfg).values()) <= published, where,
          f"publishes {sorted(published)}, meshgate listens on {listens(cfg)}")
    check(f"/dev/tcp/127.0.0.1/{listens(cfg)['admin']}" in " ".join(svc["healthcheck"]["test"])
          and "/readyz" in " ".join(svc["healthcheck"]["test"]), where,
          "healthcheck does not ask the admin port's /readyz")
check(None not in ids and len(ids) == 2, cfile, "the meshgate services need distinct instance ids")

# kubernetes ------------------------------------------------------------------------------------
kdir = os.path.join(deploy, "kubernetes")
docs = []
for f in sorted(os.listdir(kdir)):
    if f.endswith(".yaml"):
        docs += [(os.path.join(kdir, f), d) for d in yaml.safe_load_all(open(os.path.join(kdir, f))) if d]
kinds = {}
for f, d in docs:
    kinds.setdefault(d["kind"], []).append((f, d))
for kind in ("ConfigMap", "Deployment", "Service"):
    check(kind in kinds, kdir, f"no {kind}")
configmaps = {d["metadata"]["name"]: d for _, d in kinds["ConfigMap"]}
for f, dep in kinds["Deployment"]:
    where = f"{f}: {dep['metadata']['name']}"
    pod = dep["spec"]["template"]
    check(dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), where,
          "selector does not match the pod's labels")
    check(dep["spec"].get("replicas", 1) >= 2, where, "fewer than 2 replicas")
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", where, "liveness is not /healthz")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", where, "readiness is not /readyz")
    for probe in ("livenessProbe", "readinessProbe"):
        check(c[probe]["httpGet"]["port"] in ("admin", ports.get("admin")), where,
              f"{probe} is not on the admin port")
    config = c["args"][c["args"].index("--config") + 1]
    mount = next(m for m in c["volumeMounts"] if config.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    check(vol["configMap"]["name"] in configmaps, where, f"no ConfigMap {vol['configMap']['name']}")
    key = config[len(mount["mountPath"]) + 1:]
    data = configmaps[vol["configMap"]["name"]]["data"]
    check(key in data, where, f"ConfigMap {vol['configMap']['name']} has no key {key}")
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "meshgate-5d8f7c9b4-x2x7q"  # what metadata.name looks like
    cfg = validate(f"{where} (ConfigMap {vol['configMap']['name']}, {key})", data[key], env)
    check(listens(cfg) == {n: p for n, p in ports.items() if n in listens(cfg)}
          and set(ports) == set(listens(cfg)), where,
          f"container ports {ports} are not meshgate's listeners {listens(cfg)}")
    check(len(cfg["backbone"]["nats"]["urls"]) == 3, where, "backbone.nats.urls: not three NATS nodes")
    for sf, svc in kinds["Service"]:
        sel = svc["spec"]["selector"]
        check(sel.items() <= pod["metadata"]["labels"].items(), f"{sf}: {svc['metadata']['name']}",
              "selector does not match the Deployment's pods")
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in ports or p["targetPort"] in ports.values(),
                  f"{sf}: {svc['metadata']['name']}", f"targetPort {p['targetPort']} is no container port")
    exposed = {p["targetPort"] for _, s in kinds["Service"] for p in s["spec"]["ports"]}
    check(set(ports) <= exposed, kdir, f"no Service exposes {sorted(set(ports) - exposed)}")
for f, pdb in kinds.get("PodDisruptionBudget", []):
    check(pdb["spec"]["selector"]["matchLabels"].items()
          <= kinds["Deployment"][0][1]["spec"]["template"]["metadata"]["labels"].items(),
          f, "selector does not match the Deployment's pods")
print("check-deploy: cross-checks ok")
PYTHON
say "ok"
