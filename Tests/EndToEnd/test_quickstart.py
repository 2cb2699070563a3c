"""The README's first command keeps working: scripts/quickstart.sh's run step (its install and
build steps are the ones scripts/test.sh has already done) with the real agent and Envoys."""
import os
import signal
import subprocess
import sys

from conftest import AGENT_BIN, ENVOY_BIN, REPO


def test_the_quickstart_gets_a_request_through_two_envoys_over_mtls(tmp_path):
    # quickstart.py finds Envoy next to its Python, as in the project's .venv.
    assert os.path.dirname(ENVOY_BIN) == os.path.dirname(sys.executable), (ENVOY_BIN, sys.executable)
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "scripts", "quickstart.py"), "--agent", AGENT_BIN,
         "--workdir", str(tmp_path / "qs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            # SIGINT, not SIGTERM: quickstart.py then stops its agent and Envoys (by PID) itself.
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
    assert process.returncode == 0, output
    assert "spiffe://cluster.local/ns/demo/sa/frontend" in output
    assert "200 hello from backend; caller identity: spiffe://cluster.local/ns/demo/sa/frontend" in output, output
