"""The errors a newcomer meets first (issue 22, items 17-21): every bad path, file, value and
environment variable gets one plain line naming it, `config check` refuses what `serve` refuses,
and the small things a first hour runs into (CRLF files, relative paths, SIGHUP of a setting that
needs a restart, an idle node's expiry gauge, JSON that machines can read)."""
import json
import os
import signal
import subprocess

import pytest

from conftest import AGENT_BIN, ENVOY_BIN, REPO
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Node, http_get, wait_until
from test_operability import run, write
from test_served_secrets import fetch

DUMPS = ("CocoaError", "Error Domain", "UTF8View", "rawValue:", "userInfo")


def serve(workdir, *args, env=None):
    return run("serve", "--socket", os.path.join(workdir, "s.sock"), "--state-dir", os.path.join(workdir, "state"), *args,
               env=env)


def last_line(result):
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
def jwks(workdir):
    return TokenSigner().write_jwks(os.path.join(workdir, "jwks.json"))


def test_every_unreadable_path_is_one_plain_line(workdir, jwks):
    truncated = write(os.path.join(workdir, "truncated.pem"), "-----BEGIN CERTIFICATE-----\nMIIB")
    key = write(os.path.join(workdir, "key.pem"), "-----BEGIN PRIVATE KEY-----\nMIIB")
    os.chmod(key, 0o600)
    cases = [
        (["--jwks", "/nonexistent/jwks.json"], "cannot read --jwks /nonexistent/jwks.json: no such file"),
        (["--jwks", workdir], f"cannot read --jwks {workdir}: is a directory, not a file"),
        (["--jwks", ""], "cannot read --jwks : the path is empty"),
        (["--jwks", jwks, "--ca-cert", "/nonexistent/ca.pem", "--ca-key", key], "cannot read --ca-cert /nonexistent/ca.pem: no such file"),
        (["--jwks", jwks, "--ca-dir", "/nonexistent/cacerts"], "cannot read --ca-dir /nonexistent/cacerts: no such directory"),
        (["--jwks", jwks, "--ca-cert", truncated, "--ca-key", key], f"{truncated} is not PEM certificates (truncated or malformed)"),
    ]
    for args, says in cases:
        result = serve(workdir, *args)
        assert result.returncode == 1, (args, result.stderr[-1000:])
        assert says in last_line(result), (args, last_line(result))
        assert not any(dump in result.stderr for dump in DUMPS), result.stderr[-1000:]
    # bootstrap: a missing template or an unwritable output is one line and exit 1, no usage text.
    base = ["bootstrap", "--node-id", "n", "--node-cluster", "c"]
    missing = run(*base, "--template", "/nonexistent/t.yaml", "--output", os.path.join(workdir, "o.yaml"))
    assert missing.returncode == 1 and missing.stderr.strip() == "sds-agent bootstrap: cannot read --template /nonexistent/t.yaml: no such file"
    into_directory = run(*base, "--template", os.path.join(REPO, "envoy-bootstrap", "envoy-sidecar.yaml"), "--output", workdir)
    assert into_directory.returncode == 1 and "is a directory" in into_directory.stderr and "Usage" not in into_directory.stderr


def test_config_check_refuses_exactly_what_serve_refuses(workdir, jwks):
    empty = write(os.path.join(workdir, "empty.json"), '{"keys": []}')
    cases = [
        (f"jwks: {workdir}/missing.json\n", "cannot read --jwks"),
        (f"jwks: {jwks}\nadmin-socket: /tmp/{'s' * 120}.sock\n", "a Unix socket path has at most 107"),
        (f"jwks: {empty}\n", "the JWKS has no keys"),
        (f"jwks: {jwks}\nclock-skew: 100000h\n", "--clock-skew must be between 0s and 10m"),
    ]
    for content, says in cases:
        config = write(os.path.join(workdir, "c.yaml"), content)
        checked = run("config", "check", config)
        assert checked.returncode == 1 and says in checked.stderr, (content, checked.stderr)
        served = serve(workdir, "--config", config)
        assert served.returncode == 1 and says in served.stderr, (content, served.stderr[-500:])


def test_a_crlf_config_file_with_relative_paths_reads_as_written(workdir, jwks):
    directory = os.path.join(workdir, "etc")
    os.makedirs(directory)
    TokenSigner().write_jwks(os.path.join(directory, "keys.json"))
    config = os.path.join(directory, "agent.yaml")
    with open(config, "w", newline="") as f:
        f.write("trust-domain: example.org\r\njwks: keys.json\r\ncert-ttl: 2h\r\n")
    # Run from elsewhere: keys.json is found next to the file, not in the working directory.
    checked = subprocess.run([AGENT_BIN, "config", "check", config], capture_output=True, text=True, timeout=30, cwd="/")
    assert checked.returncode == 0, checked.stderr
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.agent = node.start("sds-agent", [AGENT_BIN, "serve", "--config", config, "--socket", node.socket,
                                              "--state-dir", os.path.join(node.workdir, "state")])
        wait_until(lambda: "sds-agent serving" in node.agent.output() or not node.agent.alive(), 30, "serving")
        line = next(l for l in node.agent.output().splitlines() if "effective configuration" in l)
        assert "trust-domain=example.org (file)" in line and f"jwks={directory}/keys.json (file)" in line, line
    finally:
        node.stop_all()


def test_the_environment_is_named_when_it_is_wrong(workdir, jwks):
    bad = serve(workdir, "--jwks", jwks, env={"SDS_AGENT_CERT_TTL": "banana"})
    assert bad.returncode == 1, bad.stderr
    assert "SDS_AGENT_CERT_TTL" in bad.stderr and "'banana' is invalid" in bad.stderr and "--cert-ttl" not in bad.stderr
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    os.environ["SDS_AGENT_CERT_TTLL"] = "2h"
    try:
        node.start_agent()
    finally:
        del os.environ["SDS_AGENT_CERT_TTLL"]
    try:
        assert "name no setting" in node.agent.output() and "SDS_AGENT_CERT_TTLL" in node.agent.output()
    finally:
        node.stop_all()


@pytest.mark.parametrize("args, code, says", [
    (["--socket-mode", "0"], 1, "--socket-mode 0 lets not even the owner connect"),
    (["--cert-ttl", "-5m"], 2, "The value '-5m' is invalid for '--cert-ttl"),
    (["--clock-skew", "100000h"], 1, "--clock-skew must be between 0s and 10m"),
    (["--admin-socket", "/tmp/" + "a" * 120 + ".sock"], 1, "a Unix socket path has at most 107"),
    (["--max-streams-per-caller", "0"], 1, "--max-streams-per-caller must be positive"),
])
def test_small_values_that_cannot_work(workdir, jwks, args, code, says):
    result = serve(workdir, "--jwks", jwks, *args)
    assert result.returncode == code, result.stderr[-1000:]
    assert says in result.stderr, result.stderr[-1000:]


def test_check_says_not_a_socket(workdir):
    regular = write(os.path.join(workdir, "regular"), "")
    result = run("check", "--socket", regular, "--wait", "30s")
    assert result.returncode == 1 and "is not a socket" in result.stderr, result.stderr


@pytest.mark.parametrize("args, says", [
    (["--allow-id", "spiffe://cluster.local/ns/*/sa/x"], "is not a SPIFFE ID"),
    (["--allow-id", "spiffe://"], "is not a SPIFFE ID"),
    (["--upstream-id", "spiffe://Cluster.Local/ns/a/sa/b"], "is not a SPIFFE ID"),
    (["--socket", "/tmp/" + "s" * 120], "a Unix socket path has at most 107"),
    (["--token-header", "a b"], "is not a gRPC metadata key"),
    (["--workload-secret-name", "ROOTCA"], "must be two names"),
    (["--inbound-port", "15000"], "--inbound-port and --admin-port are both 15000"),
    (["--validation-context-name", "spiffe://Cluster.Local"], "is not spiffe://<trust-domain>"),
])
def test_bootstrap_refuses_values_that_can_never_work(tmp_path, args, says):
    out = tmp_path / "b.yaml"
    result = run("bootstrap", "--template", os.path.join(REPO, "envoy-bootstrap", "envoy-sidecar.yaml"),
                 "--node-id", "n", "--node-cluster", "c", "--output", str(out), *args)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not out.exists()


def test_sighup_says_which_settings_need_a_restart_and_the_logs_speak_json(workdir):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    config = write(os.path.join(workdir, "agent.yaml"), "cert-ttl: 1h\n")
    try:
        node.start_agent("--config", config, "--metrics-address", "127.0.0.1:0", "--log-format", "json")
        # An idle node has no certificate: no expiry gauge to fire an "expiring soon" alert.
        address = metrics_address_json(node)
        assert "sds_agent_certificate_expiry_seconds" not in http_get(f"http://{address}/metrics")[1]
        fetch(node, node.signer.token("demo", "frontend"), ["default"])
        wait_until(lambda: "sds_agent_certificate_expiry_seconds " in http_get(f"http://{address}/metrics")[1], 20,
                   "the gauge once a certificate is cached")

        write(config, "cert-ttl: 2h\ndeny-namespace: [blocked]\n")
        os.kill(node.agent.pid, signal.SIGHUP)
        wait_until(lambda: "take effect only after a restart" in node.agent.output(), 10, "the restart notice")
        records = [json.loads(line) for line in node.agent.output().splitlines()]
        notice = next(r for r in records if "take effect only after a restart" in r["message"])
        assert notice["settings"] == ["cert-ttl"], notice
        reloaded = next(r for r in records if r["message"] == "authorization policy reloaded")
        assert reloaded["policy"] == "deny-namespace=[blocked]", reloaded
        serving = next(r for r in records if r["message"] == "sds-agent serving")
        assert isinstance(serving["pid"], int) and serving["validation_contexts"] == ["ROOTCA", "spiffe://cluster.local"]
        assert "\\/" not in node.agent.output()
        report = run("inspect", "--admin-socket", os.path.join(node.workdir, "state", "admin.sock"), "--json").stdout
        assert "spiffe://cluster.local" in report and "\\/" not in report
    finally:
        node.stop_all()


def metrics_address_json(node):
    def found():
        for line in node.agent.output().splitlines():
            record = json.loads(line)
            if record["message"] == "metrics endpoint listening":
                return record["address"]
        return None
    return wait_until(found, 10, "the metrics endpoint")


def test_shell_completion_is_documented():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "--generate-completion-script" in readme
    assert run("--generate-completion-script", "bash").returncode == 0
