"""`archipelago cluster up` prints a `ray job submit` line that works verbatim against the head it started,
also where Ray has run before with a token (~/.ray/auth_token: the head then refuses unauthenticated jobs)."""
from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from archipelago.cluster.local import _local_ray_token, requires_token, submit_line

REPO = Path(__file__).resolve().parents[2]


def _serve(status: int) -> tuple[http.server.HTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("status, prefixed", [(200, False), (401, True)])
def test_submit_line_switches_token_auth_on_only_when_the_head_requires_it(status, prefixed):
    server, url = _serve(status)
    try:
        assert requires_token(url) is prefixed
        line = submit_line(url, "archipelago train --config c.yaml")
    finally:
        server.shutdown()
    assert line.startswith("RAY_AUTH_MODE=token ray job submit") is prefixed
    assert line.endswith(f"ray job submit --address {url} --working-dir . -- archipelago train --config c.yaml")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "archipelago.cli", *args], check=False, capture_output=True,
                          text=True, env=env, timeout=180, cwd=REPO)


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_printed_submit_line_runs_verbatim(tmp_path, free_ports):
    """The `submit:` line, its entrypoint swapped for a one-liner, runs in a plain shell against the new head."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(var, None)
    state, temp_dir = tmp_path / "cluster.json", f"/tmp/arch-{uuid.uuid4().hex[:8]}"
    gcs, dash, client, agent, metrics = free_ports(5)
    up = _cli("cluster", "up", "--num-cpus", "1", "--port", str(gcs), "--dashboard-port", str(dash),
              "--temp-dir", temp_dir, "--state-file", str(state), f"--ray-arg=--ray-client-server-port={client}",
              f"--ray-arg=--dashboard-agent-listen-port={agent}", f"--ray-arg=--metrics-export-port={metrics}",
              env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        line = next(ln for ln in up.stdout.splitlines() if ln.startswith("submit: "))[len("submit: "):]
        assert f"--address http://127.0.0.1:{dash} " in line
        assert "-- archipelago train --config configs/digits-quickstart.yaml" in line
        command = line.split(" -- ", 1)[0] + " -- python -c \"print('submitted job ran')\""
        job = subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, env=env,
                             timeout=240, cwd=tmp_path)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "submitted job ran" in job.stdout
        if _local_ray_token():   # the case users hit: the head requires the token, the bare line is refused
            assert command.startswith("RAY_AUTH_MODE=token "), command
            bare = subprocess.run(["bash", "-c", command[len("RAY_AUTH_MODE=token "):]], check=False,
                                  capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
            assert bare.returncode != 0 and "submitted job ran" not in bare.stdout
    finally:
        down = _cli("cluster", "down", "--state-file", str(state), env=env)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
