"""Deploy/ and envoy-bootstrap/ checked by machines: Kubernetes schemas (offline, pinned), the
security settings we promise, the image recipe, every bootstrap variant under `envoy --mode
validate`, and the cluster CA recipe with the real agent.

There is no Kubernetes API server here: manifests are validated against the Kubernetes OpenAPI
schemas shipped in PyPI `kubernetes-validate`, not applied.
"""
import glob
import os
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from conftest import AGENT_BIN, ENVOY_BIN, REPO
from sdsdemo.node import Node

DEPLOY = os.path.join(REPO, "Deploy")
KUBERNETES_VERSION = "1.34.0"  # oldest schema set in kubernetes-validate 1.37.0; VAP is GA since 1.30
MANIFESTS = sorted(p for p in glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True)
                   if os.path.basename(p) != "kustomization.yaml")


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def objects():
    return [(os.path.relpath(p, DEPLOY), d) for p in MANIFESTS for d in documents(p)]


def find(kind, name):
    matches = [d for _, d in objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}"
    return matches[0]


@pytest.mark.parametrize("path", [os.path.relpath(p, DEPLOY) for p in MANIFESTS])
def test_manifest_matches_the_kubernetes_schema(path):
    for doc in documents(os.path.join(DEPLOY, path)):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_agent_manifest():
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        listed = set(yaml.safe_load(f)["resources"])
    examples = {"example-workload.yaml", "ca-secret.example.yaml"}
    on_disk = {os.path.relpath(p, DEPLOY) for p in MANIFESTS if os.path.dirname(p) == DEPLOY} - examples
    assert listed == on_disk


def agent_container():
    pod = find("DaemonSet", "sds-agent")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_the_agent_runs_locked_down():
    pod, c = agent_container()
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == find("PriorityClass", "sds-agent-node-critical")["metadata"]["name"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # Ready: the socket answers and the agent can issue (`check` exits 1 otherwise); alive: /healthz.
    assert c["readinessProbe"]["exec"]["command"][:2] == ["sds-agent", "check"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_the_metrics_port_is_the_one_the_agent_listens_on_and_prometheus_is_told():
    pod, c = agent_container()
    (flag,) = [a for a in c["args"] if a.startswith("--metrics-address=")]
    port = int(flag.rsplit(":", 1)[1])
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"] == [port]
    annotations = find("DaemonSet", "sds-agent")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"


RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


def test_the_base_grants_no_rbac_and_the_token_review_option_only_what_it_needs():
    # The JWKS-file verifier calls no API: nothing the base kustomization applies grants RBAC.
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        base = yaml.safe_load(f)["resources"]
    assert not [d for p in base for d in documents(os.path.join(DEPLOY, p)) if d["kind"] in RBAC_KINDS]
    # The opt-in file for --token-review/--oidc-discovery: create tokenreviews, plus the
    # built-in issuer-discovery role, bound to the agent's service account only.
    rbac = [(p, d) for p, d in objects() if d["kind"] in RBAC_KINDS and p == "optional/token-review-rbac.yaml"]
    roles = [d for _, d in rbac if d["kind"] in ("Role", "ClusterRole")]
    assert [r["rules"] for r in roles] == [
        [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]]
    bindings = [d for _, d in rbac if d["kind"].endswith("Binding")]
    assert {b["roleRef"]["name"] for b in bindings} == {"sds-agent-token-review", "system:service-account-issuer-discovery"}
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "sds-agent", "namespace": "sds-agent"}]


def test_only_the_optional_files_grant_rbac_and_the_central_ca_only_reads_pods():
    files = {p for p, d in objects() if d["kind"] in RBAC_KINDS}
    assert files == {"optional/token-review-rbac.yaml", "optional/central-ca.yaml", "optional/workload-attestation/rbac.yaml"}
    rbac = [d for p, d in objects() if d["kind"] in RBAC_KINDS and p == "optional/central-ca.yaml"]
    (role,) = [d for d in rbac if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    (binding,) = [d for d in rbac if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sds-agent-ca", "namespace": "sds-agent"}]


def apply_json_patch(doc, operations):
    """The JSON Patch (RFC 6902) subset kustomize overlays use here: add and replace."""
    import copy
    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = op["path"].strip("/").split("/")
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            if op["op"] == "add":
                target.insert(len(target) if last == "-" else int(last), op["value"])
            else:
                assert op["op"] == "replace"
                target[int(last)] = op["value"]
        else:
            assert op["op"] == "replace" and last in target or op["op"] == "add"
            target[last] = op["value"]
    return doc


def flags_of(*command):
    help_text = subprocess.run([AGENT_BIN, *command, "--help"], capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", help_text))


def test_the_upstream_overlay_takes_the_ca_key_off_every_node_and_points_at_the_central_ca():
    with open(os.path.join(DEPLOY, "optional", "upstream", "kustomization.yaml")) as f:
        overlay = yaml.safe_load(f)
    assert overlay["resources"] == ["../.."]
    (patch,) = overlay["patches"]
    assert patch["target"] == {"kind": "DaemonSet", "name": "sds-agent"}
    daemonset = apply_json_patch(find("DaemonSet", "sds-agent"), yaml.safe_load(patch["patch"]))
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    pod = daemonset["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    # No node holds the CA key any more.
    assert not [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "sds-agent-ca"]
    assert not any(a.startswith(("--ca-cert", "--ca-key")) for a in agent["args"])
    mounted = {m["name"] for m in agent["volumeMounts"]}
    assert mounted == {v["name"] for v in pod["volumes"]}
    # Every flag exists; the agent reaches the central CA's Service by a name its certificate holds.
    args = dict(a.split("=", 1) for a in agent["args"] if a.startswith("--"))
    assert set(args) <= flags_of("serve")
    ca = find("Deployment", "sds-agent-ca")["spec"]["template"]["spec"]
    (ca_container,) = ca["containers"]
    assert {a.split("=", 1)[0] for a in ca_container["args"] if a.startswith("--")} <= flags_of("ca", "serve")
    service = find("Service", "sds-agent-ca")
    host, port = args["--upstream-ca"].rsplit(":", 1)
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert int(port) == service["spec"]["ports"][0]["port"]
    assert f"--server-name={host}" in ca_container["args"]
    # Node mode: the agent's own token, with the audience the CA accepts, for the account it trusts.
    assert args["--upstream-ca-credential"] == "node"
    token = next(s["serviceAccountToken"] for v in pod["volumes"] if "projected" in v for s in v["projected"]["sources"])
    assert f"--audience={token['audience']}" in ca_container["args"]
    assert args["--upstream-ca-token-file"].endswith("/" + token["path"])
    account = f"{daemonset['metadata']['namespace']}/{pod['serviceAccountName']}"
    assert f"--trusted-node-account={account}" in ca_container["args"]
    assert args["--upstream-ca-bundle"].startswith(next(m["mountPath"] for m in agent["volumeMounts"] if m["name"] == "ca-root"))


def test_the_workload_attestation_overlay_adds_the_peer_attested_socket_and_reads_only_pods_and_nodes():
    with open(os.path.join(DEPLOY, "optional", "workload-attestation", "kustomization.yaml")) as f:
        overlay = yaml.safe_load(f)
    assert overlay["resources"] == ["../..", "rbac.yaml", "attestation-policy.yaml"]
    (patch,) = overlay["patches"]
    daemonset = apply_json_patch(find("DaemonSet", "sds-agent"), yaml.safe_load(patch["patch"]))
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    pod = daemonset["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    # The callers' PIDs are visible, the node is named by the downward API, the API is reachable.
    assert pod["hostPID"] is True and pod["automountServiceAccountToken"] is True
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = dict(a.split("=", 1) for a in agent["args"] if a.startswith("--"))
    assert set(args) <= flags_of("serve")
    assert args["--node-name"] == "$(NODE_NAME)"
    # The socket is in the hostPath directory the admission policy guards.
    socket_dir = next(m["mountPath"] for m in agent["volumeMounts"] if m["name"] == "socket-dir")
    assert args["--workload-socket"].startswith(socket_dir + "/")
    # The policy comes from the overlay's ConfigMap, and parses (the agent's own check).
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "attestation-policy")
    assert args["--attestation-policy"].startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    (configmap,) = documents(os.path.join(DEPLOY, "optional", "workload-attestation", "attestation-policy.yaml"))
    policy_volume = next(v for v in pod["volumes"] if v["name"] == "attestation-policy")
    assert policy_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert {m["name"] for m in agent["volumeMounts"]} == {v["name"] for v in pod["volumes"]}
    # RBAC: this node's pods and its node object, read only.
    rbac = documents(os.path.join(DEPLOY, "optional", "workload-attestation", "rbac.yaml"))
    (role,) = [d for d in rbac if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    (binding,) = [d for d in rbac if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": daemonset["metadata"]["namespace"]}]


def test_the_shipped_attestation_policy_and_its_commented_example_pass_config_check(tmp_path):
    (configmap,) = documents(os.path.join(DEPLOY, "optional", "workload-attestation", "attestation-policy.yaml"))
    shipped = configmap["data"]["policy.yaml"]
    example = "rules:\n" + "\n".join(line.replace("# ", "", 1) for line in shipped.splitlines()
                                      if line.startswith("# ") or line.startswith("#   "))
    # config check reads the files serve reads: the JWKS must be one.
    from sdsdemo.devtokens import TokenSigner
    jwks = TokenSigner().write_jwks(str(tmp_path / "jwks.json"))
    for name, text in (("shipped", shipped), ("example", example)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        config = tmp_path / f"{name}-config.yaml"
        config.write_text(yaml.safe_dump({"jwks": jwks, "attestation-policy": str(path), "node-name": "node-a",
                                          "kube-api-server": "https://127.0.0.1:6443"}))
        result = subprocess.run([AGENT_BIN, "config", "check", str(config)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (name, text, result.stdout, result.stderr)


def socket_volume_names(pod):
    return {v["name"] for v in pod.get("volumes", [])
            if v.get("hostPath", {}).get("path", "").startswith("/var/run/sds-agent")}


def test_workloads_mount_the_socket_read_only_and_only_the_agent_writes_it():
    for path, doc in objects():
        if doc["kind"] not in ("Deployment", "DaemonSet", "StatefulSet", "Pod", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"] if "template" in doc["spec"] else doc["spec"]
        names = socket_volume_names(pod)
        for c in pod["containers"] + pod.get("initContainers", []):
            for m in c.get("volumeMounts", []):
                if m["name"] in names and not (doc["kind"] == "DaemonSet" and doc["metadata"]["name"] == "sds-agent"):
                    assert m.get("readOnly") is True, f"{path}: {c['name']} mounts the socket writable"


def test_the_example_workload_waits_for_the_agent_and_uses_its_audience_and_socket():
    pod = find("Deployment", "frontend")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"][0] == "bootstrap" and any(a.startswith("--wait-for-agent=") for a in init["args"])
    _, agent = agent_container()
    agent_socket = next(a.split("=", 1)[1] for a in agent["args"] if a.startswith("--socket="))
    assert f"--socket={agent_socket}" in init["args"]
    token = next(v["projected"]["sources"][0]["serviceAccountToken"] for v in pod["volumes"] if v["name"] == "sds-token")
    assert token["audience"] == find("ConfigMap", "sds-agent-config")["data"]["audience"]
    assert token["expirationSeconds"] <= 3600
    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    assert envoy["securityContext"]["readOnlyRootFilesystem"] is True
    # The agent admits only the uid the sidecar (and the init container's wait) runs as.
    assert "--peer-allowed-uid=$(PEER_ALLOWED_UID)" in agent["args"]
    allowed_uid = int(find("ConfigMap", "sds-agent-config")["data"]["peer-allowed-uid"])
    assert envoy["securityContext"]["runAsUser"] == allowed_uid == init["securityContext"]["runAsUser"]


def test_the_image_is_built_by_the_script_ci_runs():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        dockerfile = f.read()
    assert re.search(r"^RUN scripts/build-release\.sh /out$", dockerfile, re.M)
    # The release flags have one home, which build-release.sh (and bench.sh) source.
    build = open(os.path.join(REPO, "scripts", "build-release.sh")).read()
    assert re.search(r"^source scripts/release-flags\.sh$", build, re.M)
    assert '"${release_flags[@]}"' in build
    flags = open(os.path.join(REPO, "scripts", "release-flags.sh")).read()
    assert "-c release" in flags
    # The Swift runtime is linked statically into the shipped binary alone (build-release.sh also
    # refuses a binary that needs it at run time).
    manifest = open(os.path.join(REPO, "Package.swift")).read()
    assert re.search(r'\["-static-stdlib",[^\]]*\],\s*\.when\(platforms: \[\.linux\], configuration: \.release\)', manifest)
    assert "libswift" in build
    assert "scripts/build-release.sh" in open(os.path.join(REPO, "scripts", "test.sh")).read()


def validate_bootstrap(path):
    # Envoy 1.40 prints "OK" and then crashes on exit in validate mode with google_grpc
    # (docs/ENVOY-FACTS.md), so the verdict is the OK line.
    result = subprocess.run([ENVOY_BIN, "--mode", "validate", "-c", path, "--log-level", "error"],
                            capture_output=True, text=True, timeout=60)
    assert f"configuration '{path}' OK" in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
@pytest.mark.parametrize("validation_context_name", ["ROOTCA", "spiffe://cluster.local"])
def test_every_bootstrap_variant_passes_envoy_validation(tmp_path, api_type, validation_context_name):
    out = tmp_path / "envoy.yaml"
    subprocess.run([AGENT_BIN, "bootstrap", "--template", os.path.join(REPO, "envoy-bootstrap", "envoy-sidecar.yaml"),
                    "--output", out, "--node-id", "n", "--node-cluster", "c", "--sds-api-type", api_type,
                    "--validation-context-name", validation_context_name,
                    "--allow-id", "spiffe://cluster.local/ns/demo/*", "--upstream-id", "spiffe://cluster.local/ns/demo/sa/b"],
                   check=True, timeout=30)
    validate_bootstrap(str(out))


def test_the_example_workloads_bootstrap_passes_envoy_validation(tmp_path):
    (init,) = find("Deployment", "frontend")["spec"]["template"]["spec"]["initContainers"]
    args = [a.replace("$(POD_NAME)", "frontend-abc") for a in init["args"]
            if not a.startswith(("--wait-for-agent=", "--template=", "--output="))]
    out = tmp_path / "envoy.yaml"
    subprocess.run([AGENT_BIN, *args, f"--template={REPO}/envoy-bootstrap/envoy-sidecar.yaml", f"--output={out}"],
                   check=True, timeout=30)
    validate_bootstrap(str(out))


def test_the_cluster_ca_recipe_signs_certificates_envoy_verifies(tmp_path):
    ca = tmp_path / "ca"
    subprocess.run([os.path.join(DEPLOY, "make-ca.sh"), ca, "cluster.local"], check=True, timeout=60)
    assert oct(os.stat(ca / "tls.key").st_mode & 0o777) == "0o600"
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-cert", str(ca / "tls.crt"), "--ca-key", str(ca / "tls.key"))
        from test_served_secrets import fetch
        _, secrets = fetch(node, node.signer.token("demo", "frontend"), ["default", "ROOTCA"])
        assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == (ca / "tls.crt").read_bytes()
        (tmp_path / "chain.pem").write_bytes(secrets["default"].tls_certificate.certificate_chain.inline_bytes)
        verify = subprocess.run(["openssl", "verify", "-CAfile", ca / "tls.crt", tmp_path / "chain.pem"],
                                capture_output=True, text=True, timeout=30)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        node.stop_all()


def test_the_central_ca_is_three_stateless_replicas_over_one_secret_that_survive_a_drain():
    deployment = find("Deployment", "sds-agent-ca")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}}
    pod = spec["template"]["spec"]
    labels = spec["selector"]["matchLabels"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"] == labels for c in pod["topologySpreadConstraints"])
    budget = find("PodDisruptionBudget", "sds-agent-ca")
    assert budget["spec"] == {"minAvailable": 2, "selector": {"matchLabels": labels}}
    # The CA only from the Secret: no state of its own, no other key.
    (container,) = pod["containers"]
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))
    assert "--state-dir" not in args and "--ca-cert" not in args and "--ca-key" not in args
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == args["--ca-dir"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "sds-agent-cacerts"
    assert not [v for v in pod["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v]
    # The key is group-readable for the pod's group only (the CA refuses a world-readable key).
    assert volume["secret"]["defaultMode"] & 0o007 == 0 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # Ready means able to sign (/readyz on the metrics port), so the Service hands out only those.
    port = int(args["--metrics-address"].rsplit(":", 1)[1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [port]
    # Headless: the agents see every replica's address, balance and fail over themselves.
    assert find("Service", "sds-agent-ca")["spec"]["clusterIP"] == "None"
