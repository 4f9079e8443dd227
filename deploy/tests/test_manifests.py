#!/usr/bin/env python3
"""Offline checks of palisade's deployment files (deploy/).

1. Every Kubernetes object in deploy/**/*.yaml validates, strictly (unknown
   fields are errors), against the OpenAPI schemas of several Kubernetes
   versions bundled in the pinned `kubernetes-validate` package: no network.
2. The agent's ClusterRole grants exactly the (group, resource, verbs) the
   agent watches, as listed in `pub const WATCHED: &[Watched]` in
   agent/src/k8s.rs, and nothing more.
3. The DaemonSet, ConfigMap and CNI configurations agree with each other:
   paths, socket, probes, capabilities, update strategy, conflists.

Run through deploy/tests/run.sh (creates the venv). Plain Python, no test
framework; the last line is "N passed, M failed". Exit status 1 on failure.
PALISADE_K8S_RS=<file> reads the WATCHED table from another file.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

DEPLOY = Path(__file__).resolve().parent.parent
ROOT = DEPLOY.parent
K8S_RS = Path(os.environ.get("PALISADE_K8S_RS", ROOT / "agent" / "src" / "k8s.rs"))

# Oldest supported (securityContext.appArmorProfile is GA from 1.30), the API
# the agent is compiled against (k8s-openapi feature v1_35), newest bundled.
K8S_VERSIONS = ["1.30", "1.35", "1.37"]

NAMESPACE = "palisade-system"
SERVICE_ACCOUNT = "palisade-agent"
AGENT_CAPS = {"BPF", "NET_ADMIN", "PERFMON", "NET_RAW"}
METRICS_PORT = 9962
CNI_MODES = {"standalone", "chained-flannel"}
CONFLIST_NAME = "05-palisade.conflist"
POD_CIDR_PLACEHOLDER = "__POD_CIDR__"  # replaced by install-cni

# Schemas are large; load each file once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


# ---------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if "tests" not in p.relative_to(DEPLOY).parts)


@functools.lru_cache(maxsize=None)
def documents(path: Path) -> tuple:
    with open(path) as f:
        return tuple(d for d in yaml.safe_load_all(f) if d)


def all_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in documents(p)]


def install_objects() -> list[dict]:
    return [d for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in documents(p)]


def one(kind: str, name: str) -> dict:
    found = [o for o in install_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/kubernetes, found {len(found)}"
    return found[0]


def daemonset() -> dict:
    return one("DaemonSet", "palisade-agent")


def pod_spec() -> dict:
    return daemonset()["spec"]["template"]["spec"]


def container(name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec().get(key, []) if c["name"] == name]
    assert len(found) == 1, f"expected one {key[:-1]} named {name}"
    return found[0]


def flag(c: dict, name: str) -> str:
    argv = c.get("command", []) + c.get("args", [])
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{c['name']}: no {name} flag in {argv}")


def host_path_of(c: dict, path: str) -> str:
    """The host path behind `path` inside container `c` (longest mount prefix)."""
    vols = {v["name"]: v for v in pod_spec()["volumes"]}
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, m)
    assert best, f"{c['name']}: {path} is not under any volume mount"
    mp, m = best
    vol = vols[m["name"]]
    assert "hostPath" in vol, f"{c['name']}: {path} is on volume {m['name']}, not a hostPath"
    return vol["hostPath"]["path"].rstrip("/") + path[len(mp):]


def mount(c: dict, mount_path: str) -> dict:
    found = [m for m in c.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(found) == 1, f"{c['name']}: no mount at {mount_path}"
    return found[0]


# ------------------------------------------------------- WATCHED parser


def parse_watched(source: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) triples from `pub const WATCHED: &[Watched] = &[...];`.

    Expected entries (whitespace and line breaks free, field order free,
    trailing commas allowed, `//` comments ignored):
        Watched { group: "", resource: "pods", verbs: &["get", "list", "watch"] },
    Any entry that does not parse is an error, not silently skipped.
    """
    text = re.sub(r"//[^\n]*", "", source)
    m = re.search(r"pub\s+const\s+WATCHED\s*:\s*&\s*\[\s*Watched\s*\]\s*=\s*&\s*\[", text)
    if not m:
        raise ValueError("no `pub const WATCHED: &[Watched] = &[` found")
    # The table body: up to the `]` that closes the outer `&[`.
    depth, i = 1, m.end()
    while depth:
        if i >= len(text):
            raise ValueError("unterminated WATCHED table")
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        i += 1
    body = text[m.end(): i - 1]
    entries = re.findall(r"Watched\s*\{(.*?)\}", body, re.S)
    if len(entries) != body.count("Watched"):
        raise ValueError("a WATCHED entry is not of the form `Watched { ... }`")
    leftover = re.sub(r"Watched\s*\{.*?\}", "", body, flags=re.S)
    if leftover.replace(",", "").strip():
        raise ValueError(f"unexpected text in WATCHED: {leftover.strip()[:80]!r}")
    triples = set()
    for e in entries:
        group = re.search(r'\bgroup\s*:\s*"([^"]*)"', e)
        resource = re.search(r'\bresource\s*:\s*"([^"]*)"', e)
        verbs = re.search(r"\bverbs\s*:\s*&\s*\[([^\]]*)\]", e)
        if not (group and resource and verbs):
            raise ValueError(f"WATCHED entry lacks group/resource/verbs: {e.strip()!r}")
        vs = re.findall(r'"([^"]*)"', verbs.group(1))
        if not vs or re.sub(r'"[^"]*"|[\s,]', "", verbs.group(1)):
            raise ValueError(f"bad verbs list: {verbs.group(1)!r}")
        for v in vs:
            triples.add((group.group(1), resource.group(1), v))
    if not triples:
        raise ValueError("WATCHED is empty")
    return triples


def granted(role: dict) -> set[tuple[str, str, str]]:
    triples = set()
    for rule in role.get("rules", []):
        assert not rule.get("nonResourceURLs"), f"nonResourceURLs granted: {rule}"
        assert not rule.get("resourceNames"), f"resourceNames in a rule (unexpected): {rule}"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    triples.add((g, r, v))
    return triples


SAMPLE_K8S_RS = """
/// What the agent reads from the API server (deploy/ RBAC is checked against it).
pub const WATCHED: &[Watched] = &[
    Watched { group: "", resource: "pods", verbs: &["get", "list", "watch"] },
    Watched { group: "", resource: "namespaces", verbs: &["get", "list", "watch"] },
    // the node's podCIDR
    Watched { group: "", resource: "nodes", verbs: &["get", "list", "watch"] },
    Watched {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["get", "list", "watch"],
    },
];
pub const OTHER: &[&str] = &["x"];
"""


# ------------------------------------------------------------------ tests


def test_manifests_exist():
    files = [p.relative_to(DEPLOY).as_posix() for p in manifest_files()]
    for f in ["kubernetes/00-namespace.yaml", "kubernetes/10-rbac.yaml",
              "kubernetes/20-configmap.yaml", "kubernetes/30-daemonset.yaml"]:
        assert f in files, f"missing deploy/{f}"
    kinds = {o["kind"] for o in install_objects()}
    assert kinds == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                     "ConfigMap", "DaemonSet"}, kinds


def make_schema_test(path: Path, version: str):
    def t():
        docs = documents(path)
        assert docs, f"{path} has no objects"
        for d in docs:
            name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(x) for x in e.path)
                raise AssertionError(f"{name}: {where}: {e.message}") from None
            except kv.SchemaNotFoundError as e:
                raise AssertionError(f"{name}: {e.message}") from None
    t.__name__ = f"test_schema[{path.relative_to(DEPLOY)}@{version}]"
    return t


def test_schema_rejects_a_broken_object():
    # The validator really checks (strict: unknown field; types).
    ds = json.loads(json.dumps(daemonset()))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropogation"] = "x"
    try:
        kv.validate(ds, K8S_VERSIONS[-1], strict=True)
    except kv.ValidationError:
        pass
    else:
        raise AssertionError("a misspelt field was accepted")
    ds = json.loads(json.dumps(daemonset()))
    ds["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    try:
        kv.validate(ds, K8S_VERSIONS[-1], strict=True)
    except kv.ValidationError:
        pass
    else:
        raise AssertionError("hostNetwork: 'yes' was accepted")


def test_watched_parser_on_sample():
    got = parse_watched(SAMPLE_K8S_RS)
    want = {(g, r, v) for g, r in [("", "pods"), ("", "namespaces"), ("", "nodes"),
                                   ("networking.k8s.io", "networkpolicies")]
            for v in ("get", "list", "watch")}
    assert got == want, got
    for bad in [SAMPLE_K8S_RS.replace('Watched { group: "", resource: "pods"', 'W { group: "", resource: "pods"'),
                SAMPLE_K8S_RS.replace('resource: "nodes"', 'kind: "nodes"'),
                "pub const NOT_WATCHED: &[u8] = &[];"]:
        try:
            parse_watched(bad)
        except ValueError:
            continue
        raise AssertionError(f"parser accepted a malformed table:\n{bad}")


def test_clusterrole_grants_exactly_watched():
    assert K8S_RS.exists(), f"{K8S_RS} not found (the agent's WATCHED table)"
    watched = parse_watched(K8S_RS.read_text())
    role = one("ClusterRole", "palisade-agent")
    have = granted(role)
    extra, missing = have - watched, watched - have
    assert not extra and not missing, (
        f"ClusterRole palisade-agent differs from WATCHED in {K8S_RS.relative_to(ROOT) if K8S_RS.is_relative_to(ROOT) else K8S_RS}:"
        f" grants beyond WATCHED {sorted(extra)}; WATCHED but not granted {sorted(missing)}")


def test_rbac_is_only_that_role():
    rbac = [o for o in install_objects() if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert {(o["kind"], o["metadata"]["name"]) for o in rbac} == {
        ("ClusterRole", "palisade-agent"), ("ClusterRoleBinding", "palisade-agent")}, rbac
    binding = one("ClusterRoleBinding", "palisade-agent")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "palisade-agent"}, binding["roleRef"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                    "namespace": NAMESPACE}], binding["subjects"]
    sa = one("ServiceAccount", SERVICE_ACCOUNT)
    assert sa["metadata"]["namespace"] == NAMESPACE
    assert pod_spec()["serviceAccountName"] == SERVICE_ACCOUNT
    assert pod_spec().get("automountServiceAccountToken", True) is True


def test_namespaced_objects_in_palisade_system():
    for o in install_objects():
        if o["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in o["metadata"], o["metadata"]
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"])
    ns = one("Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_node_wiring():
    spec, ds = pod_spec(), daemonset()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], spec["tolerations"]
    s = ds["spec"]["updateStrategy"]
    assert s["type"] == "RollingUpdate"
    assert s["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}, s
    sel = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sel.items()), (sel, labels)
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert len(images) == 1, f"all containers should run the one palisade image: {images}"


def test_agent_flags_and_mounts():
    agent = container("agent")
    argv = agent["command"] + agent.get("args", [])
    assert argv[:3] == ["palisade-agent", "run", "--kubernetes"], argv
    assert host_path_of(agent, flag(agent, "--socket")) == "/run/palisade/agent.sock"
    pin_root = flag(agent, "--pin-root")
    assert host_path_of(agent, pin_root) == "/sys/fs/bpf/palisade"
    assert host_path_of(agent, flag(agent, "--flow-log")).startswith("/var/log/palisade/")
    # The endpoint registry must survive the agent container.
    assert host_path_of(agent, flag(agent, "--state-dir")) == "/run/palisade"
    assert mount(agent, "/sys/fs/bpf")["mountPropagation"] == "HostToContainer"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_probes_and_metrics():
    agent = container("agent")
    addr = flag(agent, "--metrics-addr")
    assert addr.rsplit(":", 1)[1] == str(METRICS_PORT), addr
    # The node's address, not every address of the node.
    assert addr.rsplit(":", 1)[0] == "$(NODE_IP)", addr
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")]:
        g = agent[probe]["httpGet"]
        port = ports.get(g["port"], g["port"])
        assert (g["path"], port) == (path, METRICS_PORT), (probe, g)


def test_agent_capabilities():
    sc = container("agent")["securityContext"]
    assert not sc.get("privileged", False)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS, sc["capabilities"]["add"]
    assert sc["readOnlyRootFilesystem"] is True
    for c in pod_spec()["containers"]:
        assert not c.get("securityContext", {}).get("privileged", False), c["name"]


def test_only_mount_bpffs_is_privileged():
    for c in pod_spec()["initContainers"]:
        priv = c.get("securityContext", {}).get("privileged", False)
        assert priv == (c["name"] == "mount-bpffs"), c["name"]
    m = container("mount-bpffs", init=True)
    assert mount(m, "/sys/fs/bpf")["mountPropagation"] == "Bidirectional"
    assert host_path_of(m, "/sys/fs/bpf") == "/sys/fs/bpf"
    assert "mount -t bpf bpf /sys/fs/bpf" in " ".join(m["command"])


def test_resources():
    for c in pod_spec()["containers"] + pod_spec()["initContainers"]:
        r = c["resources"]
        assert "memory" in r["requests"] and "memory" in r["limits"], c["name"]
    assert container("agent")["resources"]["limits"]["memory"] == "256Mi"


def test_install_cni():
    ic = container("install-cni", init=True)
    argv = ic["command"] + ic.get("args", [])
    assert argv[:2] == ["palisade-agent", "install-cni"], argv
    assert "--kubernetes" in argv
    assert host_path_of(ic, flag(ic, "--bin-dir")) == "/opt/cni/bin"
    assert host_path_of(ic, flag(ic, "--conf-dir")) == "/etc/cni/net.d"
    sc = ic["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    # The installed name sorts before flannel's 10-flannel.conflist (and the
    # agent's default 10-palisade.conflist would not: "f" < "p").
    assert flag(ic, "--conf-name") == CONFLIST_NAME
    assert CONFLIST_NAME < "10-flannel.conflist"
    # The plugin binary is where the image puts it.
    bin_src = flag(ic, "--bin-src")
    containerfile = (DEPLOY / "Containerfile").read_text()
    copy = re.search(r"^COPY --from=build (.+) (/\S+/)$", containerfile, re.M)
    assert copy, "Containerfile: no `COPY --from=build ... /dir/` line"
    assert f"{copy.group(2)}palisade" == bin_src and "/palisade " in copy.group(1) + " ", (copy.group(0), bin_src)
    # --conflist /etc/palisade/cni/$(CNI_MODE).conflist, with CNI_MODE from
    # the ConfigMap and one ConfigMap item per mode.
    conflist = flag(ic, "--conflist")
    env = {e["name"]: e for e in ic["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ref = env["CNI_MODE"]["valueFrom"]["configMapKeyRef"]
    assert (ref["name"], ref["key"]) == ("palisade-config", "cni-mode"), ref
    cm = one("ConfigMap", "palisade-config")
    assert cm["data"]["cni-mode"] in CNI_MODES, cm["data"]["cni-mode"]
    m = [m for m in ic["volumeMounts"] if conflist.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(m) == 1, f"{conflist} is not on a mounted volume"
    vol = {v["name"]: v for v in pod_spec()["volumes"]}[m[0]["name"]]
    assert vol["configMap"]["name"] == "palisade-config"
    items = {i["path"]: i["key"] for i in vol["configMap"]["items"]}
    rel = conflist[len(m[0]["mountPath"].rstrip("/")) + 1:]
    for mode in CNI_MODES:
        path = rel.replace("$(CNI_MODE)", mode)
        assert items.get(path) == f"{mode}.conflist", (path, items)


def test_configmap_conflists_match_files():
    data = one("ConfigMap", "palisade-config")["data"]
    for mode in CNI_MODES:
        f = DEPLOY / "cni" / f"{mode}.conflist"
        assert json.loads(data[f"{mode}.conflist"]) == json.loads(f.read_text()), \
            f"ConfigMap key {mode}.conflist differs from deploy/cni/{mode}.conflist"


def agent_socket() -> str:
    return flag(container("agent"), "--socket")


def test_standalone_conflist():
    c = json.loads((DEPLOY / "cni" / "standalone.conflist").read_text())
    assert c["cniVersion"] == "1.0.0" and c["name"] == "palisade"
    assert len(c["plugins"]) == 1
    p = c["plugins"][0]
    assert p["type"] == "palisade" and not p.get("chained", False)
    assert p["agentSocket"] == agent_socket()
    assert p["ipam"] == {"type": "palisade", "subnet": POD_CIDR_PLACEHOLDER}, p["ipam"]
    assert isinstance(p["mtu"], int) and 576 <= p["mtu"] <= 9000


def cni_supported_versions() -> set[str]:
    src = (ROOT / "cni-plugin" / "src" / "config.rs").read_text()
    m = re.search(r"SUPPORTED_VERSIONS\s*:\s*&\[&str\]\s*=\s*&\[([^\]]*)\]", src)
    assert m, "cni-plugin/src/config.rs: no SUPPORTED_VERSIONS"
    return set(re.findall(r'"([^"]+)"', m.group(1)))


def test_conflist_versions_supported_by_plugin():
    supported = cni_supported_versions()
    for f in sorted((DEPLOY / "cni").glob("*.conflist")):
        v = json.loads(f.read_text())["cniVersion"]
        assert v in supported, f"{f.name}: cniVersion {v} not in the plugin's {sorted(supported)}"


def test_chained_conflist():
    c = json.loads((DEPLOY / "cni" / "chained-flannel.conflist").read_text())
    # flannel's own default: the network name keys libcni's result cache, so
    # pods created before palisade was chained in are still torn down right.
    assert c["name"] == "cbr0" and c["cniVersion"] == "0.3.1", (c["name"], c["cniVersion"])
    types = [p["type"] for p in c["plugins"]]
    assert types == ["flannel", "portmap", "palisade"], types
    p = c["plugins"][-1]
    assert p == {"type": "palisade", "chained": True, "agentSocket": agent_socket()}, p
    assert POD_CIDR_PLACEHOLDER not in json.dumps(c)


def test_connectivity_check_examples():
    objs = {(o["kind"], o["metadata"]["name"]): o
            for p in sorted((DEPLOY / "examples").glob("*.yaml")) for o in documents(p)}
    web = objs[("Pod", "web")]["metadata"]["labels"]
    deny = objs[("NetworkPolicy", "default-deny-ingress")]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    allow = objs[("NetworkPolicy", "web-from-probe")]["spec"]
    assert all(web.get(k) == v for k, v in allow["podSelector"]["matchLabels"].items())
    peers = allow["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert objs[("Pod", "probe")]["metadata"]["labels"].items() >= peers.items()
    assert not objs[("Pod", "intruder")]["metadata"]["labels"].items() >= peers.items()


# ----------------------------------------------------------------- runner


def all_tests():
    tests = [test_manifests_exist]
    for path in manifest_files():
        for v in K8S_VERSIONS:
            tests.append(make_schema_test(path, v))
    tests += [v for k, v in globals().items()
              if k.startswith("test_") and callable(v) and v is not test_manifests_exist]
    return tests


def main() -> int:
    passed = failed = 0
    for t in all_tests():
        try:
            t()
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed += 1
            msg = str(e) if isinstance(e, AssertionError) and str(e) else traceback.format_exc(limit=3)
            print(f"FAIL {t.__name__}: {msg}")
        else:
            passed += 1
            print(f"ok   {t.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
