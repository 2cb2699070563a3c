"""Quickstart driver: see scripts/quickstart.sh. Uses the same harness as the end-to-end tests."""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sdsdemo.node import Node  # noqa: E402

TD = "spiffe://cluster.local"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", required=True)
    parser.add_argument("--workdir", default=os.path.join(os.getcwd(), "run", "quickstart"))
    parser.add_argument("--keep-running", action="store_true")
    args = parser.parse_args()
    envoy_bin = os.path.join(os.path.dirname(sys.executable), "envoy")

    node = Node(args.workdir, args.agent, envoy_bin)
    try:
        print(f"1. dev token signer: JWKS at {node.jwks} (a stand-in for the API server's keys)")
        node.start_agent()
        print(f"2. sds-agent serving on {node.socket} (embedded CA in {args.workdir}/state); log: {node.agent.log_path}")
        app = node.start_app("backend")
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                   allow_ids=[f"{TD}/ns/demo/sa/frontend"])
        frontend = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                    upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/backend"])
        print(f"3. Envoys LIVE: frontend (admin :{frontend.admin_port}), backend (admin :{backend.admin_port})")
        for envoy in (frontend, backend):
            unique = {cert["serial_number"]: cert for cert in envoy.sds_certificates()}
            for cert in unique.values():
                sans = ", ".join(s.get("uri", "") for s in cert.get("subject_alt_names", []))
                print(f"   {envoy.name}: certificate {cert['serial_number'][:16]}… {sans} "
                      f"(expires {cert.get('expiration_time')})")
        status, body = frontend.get("/hello")
        print(f"4. GET http://127.0.0.1:{frontend.outbound_port}/hello -> frontend Envoy -> mTLS -> backend Envoy -> app")
        print(f"   {status} {body.strip()}")
        if status != 200:
            print(node.agent.output()[-2000:], file=sys.stderr)
            return 1
        if args.keep_running:
            print(f"\nRunning. Try: curl http://127.0.0.1:{frontend.outbound_port}/hello   (Ctrl-C stops everything)")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        node.stop_all()


if __name__ == "__main__":
    sys.exit(main())
