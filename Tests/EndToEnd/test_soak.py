"""A soak: 20-second certificates, 50 identities, streams connecting and disconnecting, and traffic
through a real Envoy pair the whole time. Requires 0 failed requests, no expired certificate ever
seen in Envoy's /certs, and flat file-descriptor and memory use (start and end are printed).

CI runs it for SDS_SOAK_SECONDS (default 30); `scripts/reliability.sh --full` runs 600.
"""
import datetime
import os
import random
import shutil
import tempfile
import threading
import time

import grpc

from conftest import AGENT_BIN, ENVOY_BIN, FRONTEND
from sdsdemo.node import Load, Node, wait_until
from test_faults import mesh, open_sotw_streams
from test_reliability import OWN_CONNECTION, TOKEN_KEY, request
from envoy.service.secret.v3 import sds_pb2_grpc

SECONDS = float(os.environ.get("SDS_SOAK_SECONDS", "30"))


def resources(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def churn(node, stop, counts, identities=48):
    """Streams for `identities` service accounts, opened and closed at random, until `stop`."""
    rng = random.Random()
    tokens = [node.signer.token("soak", f"sa-{i}", ttl=3600) for i in range(identities)]
    while not stop.is_set():
        token = rng.choice(tokens)
        with grpc.insecure_channel(f"unix:{node.socket}", options=OWN_CONNECTION) as channel:
            done = threading.Event()

            def requests():
                yield request(["default", "ROOTCA"])
                done.wait(10)

            try:
                responses = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(
                    requests(), metadata=[(TOKEN_KEY, token.encode())], timeout=30)
                next(responses)
                counts["served"] += 1
                stop.wait(rng.uniform(0.2, 2.0))  # the stream's life: the workload, not a synchronisation
            except grpc.RpcError as error:
                counts["failed"] += 1
                counts.setdefault("errors", []).append(f"{error.code()}: {error.details()}"[:200])
            finally:
                done.set()


def expired_certificates(envoy, now):
    expired = []
    for cert in envoy.sds_certificates():
        expiry = datetime.datetime.fromisoformat(cert["expiration_time"].replace("Z", "+00:00"))
        if expiry <= now:
            expired.append((cert["serial_number"], cert["expiration_time"]))
    return expired


def test_soak_with_short_certificates_and_churning_streams():
    workdir = tempfile.mkdtemp(prefix="sds-soak-")
    node = Node(workdir, AGENT_BIN, ENVOY_BIN)
    stop = threading.Event()
    try:
        node.start_agent("--cert-ttl", "20s", "--metrics-address", "127.0.0.1:0", "--log-level", "info")
        server, front = mesh(node)
        wait_until(lambda: open_sotw_streams(node) >= 4, 30, "the Envoys' streams")
        counts = {"served": 0, "failed": 0}
        workers = [threading.Thread(target=churn, args=(node, stop, counts), daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        load = Load(front, max_seconds=SECONDS + 120)
        wait_until(lambda: counts["served"] >= 20 and load.total >= 20, 60, "the soak to warm up")
        start_rss, start_fds = resources(node.agent.pid)
        peak_rss, peak_fds = start_rss, start_fds
        expired, rotations = [], {frozenset(front.serials_for(FRONTEND))}
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            now = datetime.datetime.now(datetime.timezone.utc)
            for envoy in (server, front):
                expired += expired_certificates(envoy, now)
            rotations.add(frozenset(front.serials_for(FRONTEND)))
            rss, fds = resources(node.agent.pid)
            peak_rss, peak_fds = max(peak_rss, rss), max(peak_fds, fds)
            stop.wait(2)  # the sampling period
        stop.set()
        for w in workers:
            w.join(30)
        results = load.stop()
        # Churn streams are closed now: what is left is the Envoys' own.
        wait_until(lambda: resources(node.agent.pid)[1] <= start_fds, 30, "the churned connections to close")
        end_rss, end_fds = resources(node.agent.pid)
        print(f"soak {SECONDS:.0f} s: {sum(results.values())} requests through Envoy, "
              f"{counts['served']} churn streams served, {counts['failed']} failed, {len(rotations) - 1} rotations; "
              f"RSS {start_rss // 1024} -> {end_rss // 1024} MiB (peak {peak_rss // 1024}), "
              f"fds {start_fds} -> {end_fds} (peak {peak_fds})")
        assert set(results) == {200}, f"failed requests: {results} {load.errors[:3]}"
        assert counts["failed"] == 0, counts.get("errors", [])[:5]
        assert not expired, f"Envoy held an expired certificate: {expired[:3]}"
        assert len(rotations) >= 1 + int(SECONDS // 15), f"only {len(rotations) - 1} rotations in {SECONDS} s"
        assert end_fds <= start_fds, f"descriptors grew: {start_fds} -> {end_fds}"
        assert end_rss - start_rss < 64 * 1024, f"RSS grew by {(end_rss - start_rss) // 1024} MiB"
    finally:
        stop.set()
        node.stop_all()
        if os.environ.get("SDS_E2E_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
