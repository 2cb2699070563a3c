"""Operating the agent at 3 a.m.: configuration from a file and the environment, bad values refused
by name, health and readiness that tell the truth, inspect, JSON logs, reload, version, exit codes."""
import json
import os
import re
import signal
import subprocess

import grpc
import pytest

from conftest import AGENT_BIN, ENVOY_BIN, REPO, TD
from fake_apiserver import FakeAPIServer
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Node, free_port, http_get, wait_until
from test_served_secrets import fetch


def run(*args, env=None, timeout=30):
    return subprocess.run([AGENT_BIN, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def metrics_address(node):
    match = wait_until(lambda: ([None] + list(re.finditer(r"address=(\S+).*metrics endpoint listening",
                                                          node.agent.output())))[-1], 10, "the metrics endpoint")
    return match.group(1)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def test_settings_come_from_flags_then_environment_then_file(workdir):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    config = write(os.path.join(workdir, "agent.yaml"),
                   "cert-ttl: \"2h\"\nrotation-fraction: 0.6\naudience: [file-aud, sds-agent]\n"
                   "max-connections: 100\nlog-level: debug\n")
    os.environ["SDS_AGENT_CERT_TTL"] = "3h"
    os.environ["SDS_AGENT_MAX_CONNECTIONS"] = "200"
    try:
        node.start_agent("--config", config, "--max-connections", "300",
                         "--kube-api-server", "https://user:hunter2@127.0.0.1:1")
    finally:
        del os.environ["SDS_AGENT_CERT_TTL"], os.environ["SDS_AGENT_MAX_CONNECTIONS"]
    try:
        log = node.agent.output()
        line = next(l for l in log.splitlines() if "effective configuration" in l)
        assert "cert-ttl=3h (environment)" in line            # environment over file
        assert "max-connections=300 (flag)" in line           # flag over environment and file
        assert "rotation-fraction=0.6 (file)" in line
        assert "audience=[file-aud, sds-agent] (file)" in line
        assert "hunter2" not in log and "REDACTED@127.0.0.1" in line
        assert " debug " in log                               # the file's log level took effect
        # The environment's lifetime is the one issued.
        from cryptography import x509
        _, secrets = fetch(node, node.signer.token("demo", "frontend"), ["default"])
        leaf = x509.load_pem_x509_certificate(secrets["default"].tls_certificate.certificate_chain.inline_bytes)
        lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        assert 3 * 3600 <= lifetime <= 3 * 3600 + 61
    finally:
        node.stop_all()


@pytest.mark.parametrize("content, code, says", [
    ("trust-domain: cluster.local\n", 0, "ok"),
    ("trust-domian: cluster.local\n", 1, "unknown key 'trust-domian'"),
    ("cert-ttl: five minutes\n", 1, "cert-ttl"),
    ("issuer: \"\"\n", 1, "--issuer must not be empty"),
    ("audience: {a: b}\n", 1, "'audience' must be a single value"),
    ("oidc-discovery: maybe\n", 1, "'oidc-discovery' is a switch"),
    ("- a\n- b\n", 1, "the top level must be a mapping"),
])
def test_config_check_names_the_key_and_the_value(workdir, content, code, says):
    # A real JWKS: config check reads the files serve reads (an empty key set is refused).
    jwks = TokenSigner().write_jwks(os.path.join(workdir, "j.json"))
    path = write(os.path.join(workdir, "c.yaml"), content + "jwks: " + jwks + "\n" if not content.startswith("-") else content)
    result = run("config", "check", path)
    assert result.returncode == code, result.stdout + result.stderr
    assert says in result.stdout + result.stderr


@pytest.mark.parametrize("args, code, says", [
    (["--issuer", ""], 1, "--issuer must not be empty"),
    (["--audience", ""], 1, "--audience must not be empty"),
    (["--validation-context-name", ""], 1, "--validation-context-name must not be empty"),
    (["--state-dir", ""], 1, "--state-dir must not be empty"),
    (["--token-expiry-margin", "48h"], 1, "--token-expiry-margin 48h is not shorter"),
    (["--ca-bundle", "/etc/hosts"], 1, "--ca-bundle names the roots of a CA"),
    (["--log-level", "verbose"], 2, "--log-level"),
    (["--cert-ttl", "5x"], 2, "a duration such as 24h"),
    (["--cert-ttl", "9999999999999999h"], 2, "at most 876000h"),
    (["--no-such-flag"], 2, "no-such-flag"),
])
def test_every_bad_value_is_refused_with_its_name(workdir, args, code, says):
    jwks = TokenSigner().write_jwks(os.path.join(workdir, "jwks.json"))
    result = run("serve", "--socket", os.path.join(workdir, "s.sock"), "--jwks", jwks,
                 "--state-dir", os.path.join(workdir, "state"), *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert says in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "s.sock"))


def test_an_upper_case_log_level_is_that_level(workdir):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--log-level", "DEBUG")
        assert " debug " in node.agent.output()
    finally:
        node.stop_all()


def test_readiness_waits_for_the_verifier_keys_and_check_says_why(workdir):
    signer = TokenSigner()
    port = free_port()
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    api_dir = os.path.join(workdir, "api")
    os.makedirs(api_dir)
    # The API server's CA and token exist, but nothing listens yet: OIDC discovery fails.
    api = FakeAPIServer(api_dir, signer, port=port)
    node.agent = node.start("sds-agent", [
        AGENT_BIN, "serve", "--socket", node.socket, "--state-dir", os.path.join(node.workdir, "state"),
        "--oidc-discovery", *api.agent_args(), "--metrics-address", "127.0.0.1:0"])
    try:
        address = metrics_address(node)
        assert http_get(f"http://{address}/healthz")[0] == 200
        wait_until(lambda: os.path.exists(node.socket), 10, "the socket")
        status, body = http_get(f"http://{address}/readyz")
        assert status == 503 and "no token verification keys yet" in body, body
        check = run("check", "--socket", node.socket)
        assert check.returncode == 1 and "not ready" in check.stderr, check.stderr
        with api:
            wait_until(lambda: http_get(f"http://{address}/readyz")[0] == 200, 30, "ready once the keys are fetched")
            check = run("check", "--socket", node.socket)
            assert check.returncode == 0, check.stderr
    finally:
        node.stop_all()


def test_check_exit_codes(workdir):
    missing = run("check", "--socket", os.path.join(workdir, "none.sock"))
    assert missing.returncode == 1 and "no ready sds-agent" in missing.stderr
    usage = run("check", "--wait", "soon")
    assert usage.returncode == 2


def test_inspect_shows_what_envoy_received(node, envoys):
    envoy = envoys("inspected", node.token_file("inspected", "demo", "inspected"))
    serial = wait_until(lambda: next(iter(envoy.serials_for(f"{TD}/ns/demo/sa/inspected")), None), 30, "a certificate")
    admin = os.path.join(node.workdir, "state", "admin.sock")
    assert oct(os.stat(admin).st_mode & 0o777) == "0o600"
    table = run("inspect", "--admin-socket", admin)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(f"{TD}/ns/demo/sa/inspected "))
    assert serial in row and "demo/inspected-" in row
    assert "TRUST BUNDLE" in table.stdout
    report = json.loads(run("inspect", "--admin-socket", admin, "--json").stdout)
    (identity,) = [i for i in report["identities"] if i["spiffe_id"] == f"{TD}/ns/demo/sa/inspected"]
    assert identity["serial"] == serial and identity["streams"] >= 1
    assert report["agent"]["ready"] is True
    assert report["trust_bundles"][0]["roots"][0]["not_after"]
    assert run("inspect", "--admin-socket", os.path.join(node.workdir, "nothing.sock")).returncode == 1


def test_json_logs_are_one_object_per_line_whatever_the_token_holds(workdir):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--log-format", "json", "--log-level", "debug")
        claims = node.signer.claims("demo", "frontend")
        claims["sub"] = "system:serviceaccount:demo:frontend\n2026-11-30T00:00:00Z notice forged line"
        claims["iss"] = "https://evil\r\n\"}{\"level\":\"critical\""
        with pytest.raises(grpc.RpcError):
            fetch(node, node.signer.sign(claims), ["default"])
        wait_until(lambda: "wrong_issuer" in node.agent.output(), 10, "the refusal logged")
        lines = node.agent.output().splitlines()
        records = [json.loads(line) for line in lines]  # every line parses
        assert all({"time", "level", "message"} <= set(r) for r in records)
        refusal = next(r for r in records if "token failed verification" in r["message"])
        assert refusal["level"] == "warning" and "forged line" not in refusal["message"]
        assert not any(r["message"].startswith("2026-11-30T00:00:00Z") for r in records)
    finally:
        node.stop_all()


def test_sighup_reloads_the_jwks_file_the_log_level_and_the_policy(workdir):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    config = write(os.path.join(workdir, "agent.yaml"), "log-level: info\n")
    try:
        node.start_agent("--config", config)
        rotated = TokenSigner()
        token = rotated.token("demo", "frontend")
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, token, ["default"])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The API server's new key joins the JWKS; the file's log level goes to debug.
        node.signer.write_jwks(node.jwks, extra_keys=[rotated])
        write(config, "log-level: debug\ndeny-namespace: [blocked]\n")
        os.kill(node.agent.pid, signal.SIGHUP)
        wait_until(lambda: "JWKS reloaded" in node.agent.output(), 10, "the reload")
        assert "log level changed" in node.agent.output()
        assert "authorization policy reloaded" in node.agent.output()
        _, secrets = fetch(node, token, ["default"])
        assert "default" in secrets
        with pytest.raises(grpc.RpcError) as denied:
            fetch(node, node.signer.token("blocked", "app"), ["default"])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A broken file changes nothing: the keys stay, the agent says why.
        write(node.jwks, "{not json")
        write(config, "log-level: [loud]\n")
        os.kill(node.agent.pid, signal.SIGHUP)
        wait_until(lambda: "JWKS reload failed" in node.agent.output(), 10, "the failed reload")
        assert "reload refused" in node.agent.output()
        _, secrets = fetch(node, rotated.token("demo", "backend"), ["default"])
        assert "default" in secrets and node.agent.alive()
    finally:
        node.stop_all()


def test_version_and_build_info_and_help_text_on_every_metric(node):
    for args in (["version"], ["--version"]):
        result = run(*args)
        assert result.returncode == 0 and re.match(r"sds-agent \d+\.\d+\.\d+ \(commit \S+, Swift \S+", result.stdout)
    address = metrics_address(node)
    status, body = http_get(f"http://{address}/metrics")
    assert 'sds_agent_build_info{' in body
    types = re.findall(r"^# TYPE (\S+)", body, re.M)
    helps = set(re.findall(r"^# HELP (\S+)", body, re.M))
    assert types and set(types) <= helps, set(types) - helps
    assert http_get(f"http://{address}/healthz") == (200, "ok\n")
    assert http_get(f"http://{address}/readyz") == (200, "ready\n")


def test_help_shows_every_default():
    help_text = run("serve", "--help").stdout
    for flag, default in (("--cert-ttl", "24h"), ("--token-expiry-margin", "30s"), ("--idle-connection-timeout", "5m"),
                          ("--first-request-timeout", "10s"), ("--ca-ttl", "8760h"), ("--log-level", "info")):
        block = help_text[help_text.index(flag):]
        block = block[:block.index("\n  --", 1)] if "\n  --" in block[1:] else block
        assert f"default: {default})" in " ".join(block.split()), block


def test_bootstrap_refuses_what_envoy_would_refuse(tmp_path):
    base = ["bootstrap", "--template", os.path.join(REPO, "envoy-bootstrap", "envoy-sidecar.yaml"),
            "--node-id", "n", "--node-cluster", "c"]
    bad = run(*base, "--output", str(tmp_path / "bad.yaml"), "--inbound-address", "bogus")
    assert bad.returncode == 2 and "--inbound-address 'bogus' is not an IP address" in bad.stderr
    assert not (tmp_path / "bad.yaml").exists()
    assert run(*base, "--initial-fetch-timeout", "soon").returncode == 2
    # A duration Envoy's YAML cannot take as written is converted, and Envoy accepts the result.
    out = tmp_path / "ok.yaml"
    good = run(*base, "--output", str(out), "--initial-fetch-timeout", "5m", "--upstream-address", "backend.demo.svc")
    assert good.returncode == 0, good.stderr
    assert "initial_fetch_timeout: 300s" in out.read_text()
    from test_deploy import validate_bootstrap
    validate_bootstrap(str(out))
