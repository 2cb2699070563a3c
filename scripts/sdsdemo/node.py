"""A local "node": one sds-agent, Envoy sidecars rendered from envoy-bootstrap/, and demo apps.

Every process is started with subprocess and stopped by its PID; every wait is bounded.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from .devtokens import TokenSigner, write_token

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRUST_DOMAIN = "cluster.local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Polls `predicate` until it returns a truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # keep polling; report the last failure
            last = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def http_get(url: str, timeout: float = 5.0):
    """GET `url`; returns (status, body) and never raises for HTTP errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Process:
    """A child process tracked by PID, with its output in a log file."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0):
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")


class Envoy:
    """One Envoy sidecar with its ports."""

    def __init__(self, name, process, admin_port, inbound_port, outbound_port, bootstrap_path):
        self.name = name
        self.process = process
        self.admin_port = admin_port
        self.inbound_port = inbound_port
        self.outbound_port = outbound_port
        self.bootstrap_path = bootstrap_path

    def admin(self, path: str):
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def ready(self) -> str:
        status, body = self.admin("/ready")
        return body.strip()

    def server_info(self) -> dict:
        return json.loads(self.admin("/server_info")[1])

    def stats(self) -> dict:
        _, body = self.admin("/stats?format=json")
        return {s["name"]: s.get("value") for s in json.loads(body)["stats"] if "value" in s}

    def serials_for(self, uri: str) -> set:
        """Serials of the SDS certificates Envoy holds whose URI SAN is `uri`."""
        return {c["serial_number"] for c in self.sds_certificates()
                if any(s.get("uri") == uri for s in c.get("subject_alt_names", []))}

    def sds_certificates(self) -> list:
        """The certificates Envoy holds from SDS (path "<inline>"), from /certs."""
        _, body = self.admin("/certs")
        found = []
        for entry in json.loads(body).get("certificates", []):
            for cert in entry.get("cert_chain", []) + entry.get("ca_cert", []):
                if cert.get("path") == "<inline>":
                    found.append(cert)
        return found

    def get(self, path: str = "/"):
        return http_get(f"http://127.0.0.1:{self.outbound_port}{path}")


class Load:
    """Requests sent continuously through an Envoy from background threads, bounded in time."""

    def __init__(self, envoy, threads=2, max_seconds=300):
        import threading
        self.envoy = envoy
        self.results = {}
        self.errors = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                status, body = self.envoy.get("/load")
            except Exception as error:  # connection refused, reset...
                status, body = "error", repr(error)
            with self._lock:
                self.results[status] = self.results.get(status, 0) + 1
                if status != 200 and len(self.errors) < 20:
                    self.errors.append((status, body[:200]))

    @property
    def total(self):
        with self._lock:
            return sum(self.results.values())

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return dict(self.results)


class Node:
    """The agent, its Envoys and their apps, all under `workdir`."""

    def __init__(self, workdir: str, agent_bin: str, envoy_bin: str):
        self.workdir = workdir
        self.agent_bin = agent_bin
        self.envoy_bin = envoy_bin
        os.makedirs(workdir, exist_ok=True)
        self.socket = os.path.join(workdir, "sock", "sds.sock")
        self.signer = TokenSigner()
        self.jwks = self.signer.write_jwks(os.path.join(workdir, "jwks.json"))
        self.processes = []
        self.agent = None
        self._base_id = int.from_bytes(os.urandom(2), "big") * 10

    def start(self, name, argv, cwd=None):
        process = Process(name, argv, os.path.join(self.workdir, f"{name}.log"), cwd=cwd)
        self.processes.append(process)
        return process

    def start_agent(self, *extra_args, wait: float = 60.0, jwks: bool = True):
        """Starts the agent; `jwks=False` leaves out `--jwks` (keys from the API server instead)."""
        self.agent = self.start("sds-agent", [
            self.agent_bin, "serve", "--socket", self.socket, "--trust-domain", TRUST_DOMAIN,
            *(["--jwks", self.jwks] if jwks else []), "--state-dir", os.path.join(self.workdir, "state"), *extra_args])
        # Start order: Envoy must not start before the agent answers (docs/ENVOY-FACTS.md).
        subprocess.run([self.agent_bin, "check", "--socket", self.socket, "--wait", f"{int(wait)}s"],
                       check=True, capture_output=True, timeout=wait + 10)
        return self.agent

    def agent_metrics(self) -> dict:
        """Scrapes the agent's /metrics (started with `--metrics-address 127.0.0.1:0`; the bound
        address is read from its log) into {'name{labels}': value}."""
        # swift-log's stream handler prints the metadata before the message.
        # The last match: a restarted agent appends to the same log with a new port.
        match = wait_until(lambda: ([None] + list(re.finditer(r"address=(\S+).*metrics endpoint listening",
                                                              self.agent.output())))[-1],
                           10, "the agent's metrics endpoint")
        status, body = http_get(f"http://{match.group(1)}/metrics")
        assert status == 200, body
        return {key: float(value) for key, value in
                (line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))}

    def token_file(self, name, namespace, service_account, token=None, **claims) -> str:
        path = os.path.join(self.workdir, f"{name}.token")
        return write_token(path, token or self.signer.token(namespace, service_account, **claims))

    def start_app(self, name) -> int:
        port = free_port()
        self.start(f"app-{name}", [sys.executable, os.path.join(REPO, "scripts", "sdsdemo", "app.py"),
                                   str(port), name])
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 200, 10, f"app {name}")
        return port

    def start_envoy(self, name, token_file, app_port=None, allow_ids=(), upstream_port=None, upstream_ids=(),
                    validation_context_name="ROOTCA", initial_fetch_timeout="0s", wait_live=True,
                    api_type="GRPC", max_requests_per_connection=1000, launcher=(), cwd=None,
                    transform=None, bootstrap_args=()) -> Envoy:
        """Renders the bootstrap and starts Envoy; `launcher` is an argv prefix that must exec Envoy
        (so the tracked PID is Envoy's); `transform(path)` may rewrite the rendered bootstrap;
        `cwd` is Envoy's working directory."""
        admin, inbound, outbound = free_port(), free_port(), free_port()
        bootstrap = os.path.join(self.workdir, f"envoy-{name}.yaml")
        args = [self.agent_bin, "bootstrap", "--template", os.path.join(REPO, "envoy-bootstrap", "envoy-sidecar.yaml"),
                "--output", bootstrap, "--socket", self.socket, "--token-file", token_file,
                "--node-id", name, "--node-cluster", name, "--admin-port", str(admin),
                "--inbound-address", "127.0.0.1", "--inbound-port", str(inbound),
                "--app-port", str(app_port or free_port()), "--outbound-port", str(outbound),
                "--upstream-port", str(upstream_port or free_port()),
                "--validation-context-name", validation_context_name,
                "--initial-fetch-timeout", initial_fetch_timeout, "--sds-api-type", api_type,
                "--upstream-max-requests-per-connection", str(max_requests_per_connection)]
        for spiffe_id in allow_ids:
            args += ["--allow-id", spiffe_id]
        for spiffe_id in upstream_ids:
            args += ["--upstream-id", spiffe_id]
        args += list(bootstrap_args)
        subprocess.run(args, check=True, capture_output=True, timeout=30)
        if transform:
            transform(bootstrap)
        self._base_id += 1
        process = self.start(f"envoy-{name}", [
            *launcher, self.envoy_bin, "-c", bootstrap, "--base-id", str(self._base_id), "--log-level", "warning",
            "--drain-time-s", "1", "--parent-shutdown-time-s", "2"], cwd=cwd)
        envoy = Envoy(name, process, admin, inbound, outbound, bootstrap)
        if wait_live:
            wait_until(lambda: process.alive() and envoy.ready() == "LIVE" or not process.alive(), 60,
                       f"envoy {name} LIVE")
            if not process.alive():
                raise RuntimeError(f"envoy {name} exited:\n{process.output()[-3000:]}")
        return envoy

    def stop_all(self):
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
