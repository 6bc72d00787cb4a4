"""A Ray head on this machine for laptops (`archipelago cluster up|status|down`), and a report on a remote one.

`up` runs `ray start --head --num-cpus=N --dashboard-host 127.0.0.1 --block` in its own process group and
records its pid in a state file, so `down` stops exactly that head (the blocking `ray start` tears down every
Ray process it started on SIGTERM) instead of `ray stop`, which kills every Ray instance of the user on the
machine. On a cluster (an address is given) `up` and `status` only connect and report; `down` stops nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from archipelago.cluster.spec import is_job_address, redact_address
from archipelago.errors import ArchipelagoError

DEFAULT_STATE_FILE = Path("~/.archipelago/local-cluster.json")


class ClusterError(ArchipelagoError):
    """The local Ray head cannot be started, reached or stopped."""


@dataclass
class LocalHead:
    """What `cluster up` started (the content of the state file)."""
    pid: int                # the blocking `ray start --head` process (leader of its process group)
    gcs_address: str        # 127.0.0.1:<port>: for ray.init(address=...) / RAY_ADDRESS
    dashboard_url: str      # http://127.0.0.1:<dashboard port>: for `ray job submit --address`
    num_cpus: int
    temp_dir: str | None    # Ray's session root (None: /tmp/ray)
    log_file: str
    started_at: float


def state_path(state_file: str | Path | None = None) -> Path:
    return Path(state_file or os.environ.get("ARCHIPELAGO_CLUSTER_STATE") or DEFAULT_STATE_FILE).expanduser()


def _ray_exe() -> str:
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if not exe:
        raise ClusterError("the `ray` command is not installed in this environment: pip install 'ray[default]'")
    return exe


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie child of ours counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this very process counts as dead.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def dashboard_up(url: str, timeout: float = 2.0) -> bool:
    """True if a Ray dashboard answers at `url` (any HTTP status: an auth error still means it is up)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/version", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def requires_token(url: str, timeout: float = 5.0) -> bool:
    """Whether the Ray dashboard at `url` refuses requests without Ray's auth token. A head started while
    ~/.ray/auth_token exists turns token auth on, and a plain `ray job submit` is then refused (401)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/jobs/", timeout=timeout):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)
    except (urllib.error.URLError, OSError):
        return False


def submit_line(dashboard_url: str, entrypoint: str) -> str:
    """The `ray job submit` command that works verbatim against this head (token auth switched on for the
    client when the head requires it: Ray's CLI sends the token only in RAY_AUTH_MODE=token)."""
    auth = "RAY_AUTH_MODE=token " if requires_token(dashboard_url) else ""
    return f"{auth}ray job submit --address {dashboard_url} --working-dir . -- {entrypoint}"


def read_state(state_file: str | Path | None = None) -> LocalHead | None:
    p = state_path(state_file)
    if not p.is_file():
        return None
    try:
        return LocalHead(**json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ClusterError(f"{p}: not a cluster state file ({exc}); delete it") from None


def cluster_up(num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
               temp_dir: str | None = None, state_file: str | Path | None = None, timeout: float = 90.0,
               extra_args: list[str] | None = None) -> tuple[LocalHead, bool]:
    """Start a local Ray head (or find the one already started); returns (head, started_now).

    extra_args: more `ray start` flags, e.g. ["--ray-client-server-port=10002"] next to another head."""
    p = state_path(state_file)
    head = read_state(p)
    if head is not None and pid_alive(head.pid) and dashboard_up(head.dashboard_url):
        return head, False
    n = int(num_cpus or os.cpu_count() or 1)
    log_dir = Path(temp_dir or p.parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "ray-head.log"
    cmd = [_ray_exe(), "start", "--head", f"--num-cpus={n}", "--dashboard-host", "127.0.0.1", f"--port={port}",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats", "--block"]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    cmd.extend(extra_args or [])
    # Jobs run `archipelago ...` on this head: put this environment's scripts first on its PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    head = LocalHead(pid=proc.pid, gcs_address=f"127.0.0.1:{port}",
                     dashboard_url=f"http://127.0.0.1:{dashboard_port}", num_cpus=n, temp_dir=temp_dir,
                     log_file=str(log_file), started_at=time.time())
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"`ray start --head` exited with code {proc.returncode}: {_tail(log_file)} "
                               f"(full log: {log_file})")
        if dashboard_up(head.dashboard_url, timeout=1.0):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(asdict(head), indent=2) + "\n")
            return head, True
        time.sleep(0.5)
    _stop_group(proc.pid, timeout=10)
    raise ClusterError(f"the Ray head did not open its dashboard {head.dashboard_url} within {timeout:.0f}s "
                       f"(port in use? see {log_file})")


def _local_ray_token() -> str | None:
    """The Ray auth token this machine holds ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def job_client(address: str):
    """JobSubmissionClient for a dashboard URL. A head started while a token exists requires it, but the
    client sends it only in RAY_AUTH_MODE=token: on an authentication error, retry once with the token."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        token = _local_ray_token()
        if "Authentication" not in f"{type(exc).__name__} {exc}" or not token:
            raise
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})


def cluster_status(address: str | None = None, state_file: str | Path | None = None) -> str:
    """A short report: the local head from the state file, or the cluster at `address`."""
    if address and is_job_address(address):
        try:
            client = job_client(address)
            version = client.get_version()
            jobs = client.list_jobs()
        except Exception as exc:  # noqa: BLE001 - connection errors of several kinds
            raise ClusterError(f"cannot reach the Ray dashboard at {redact_address(address)} "
                               f"({type(exc).__name__}); is the cluster up and the port forwarded?") from None
        running = sum(1 for j in jobs if str(j.status) in ("RUNNING", "JobStatus.RUNNING"))
        return (f"Ray cluster at {redact_address(address)}: API version {version}, {len(jobs)} jobs "
                f"({running} running)")
    if address is None:
        head = read_state(state_file)
        if head is None:
            return _ray_status(None)
        if not pid_alive(head.pid):
            return f"local Ray head (pid {head.pid}) is not running; start it with `archipelago cluster up`"
        return (f"local Ray head: pid {head.pid}, address {head.gcs_address}, dashboard {head.dashboard_url}, "
                f"{head.num_cpus} CPUs\n" + _ray_status(head.gcs_address))
    return _ray_status(address)


def _ray_status(address: str | None) -> str:
    cmd = [_ray_exe(), "status"] + ([f"--address={address}"] if address else [])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env=env)
        # A head started while ~/.ray/auth_token exists requires the token, but `ray status` does not switch
        # token auth on by itself (Ray 2.5x): retry once in token mode unless the user chose a mode.
        if res.returncode != 0 and "InvalidAuthToken" in res.stderr + res.stdout and "RAY_AUTH_MODE" not in os.environ:
            res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env={**env, "RAY_AUTH_MODE": "token"})
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`ray status` did not answer within 60s ({redact_address(address) or 'local'})") \
            from None
    if res.returncode != 0:
        raise ClusterError(f"no Ray cluster at {redact_address(address) or 'this machine'}: "
                           f"{_last_line(res.stderr or res.stdout)}; start one with `archipelago cluster up`")
    return res.stdout.strip()


def cluster_down(state_file: str | Path | None = None, timeout: float = 30.0) -> LocalHead | None:
    """Stop the head `cluster up` started (SIGTERM to its `ray start --block`); None if there was none."""
    p = state_path(state_file)
    head = read_state(p)
    if head is None:
        return None
    if pid_alive(head.pid):
        _stop_group(head.pid, timeout)
    p.unlink(missing_ok=True)
    return head


def ray_stop_all() -> str:
    """`ray stop`: every Ray process of this user on this machine (the --force path of `cluster down`)."""
    res = subprocess.run([_ray_exe(), "stop"], check=False, capture_output=True, text=True, timeout=120)
    return (res.stdout + res.stderr).strip()


def _stop_group(pid: int, timeout: float) -> None:
    """SIGTERM the `ray start --block` leader (it stops its head cleanly), then SIGKILL leftovers of its group."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and pid_alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # the group is ours: start_new_session made pid its leader
    except (ProcessLookupError, PermissionError):
        pass


def connect_ray(address: str | None = None, hint: str = "check RAY_ADDRESS", timeout_s: float = 5.0,
                **init_kwargs: Any) -> bool:
    """ray.init unless Ray is connected already: `address`, else $RAY_ADDRESS, else a new local instance.
    True when this call connected (the caller may shut it down).

    A host:port where nothing answers is one ClusterError line within `timeout_s`, instead of Ray's own
    minutes of retries; any other ray.init failure is one line too. `hint` names the setting to fix.
    """
    import ray

    from archipelago.errors import failure_line

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None:
        stale = stale_bootstrap(init_kwargs.get("_temp_dir"), timeout_s=min(timeout_s, 2.0))
        if stale is not None:
            file, recorded = stale
            print(f"note: {file} records a Ray head at {recorded} that no longer answers (it died without "
                  f"`ray stop`); starting a fresh local Ray instance instead", file=sys.stderr, flush=True)
            target = "local"
    where = redact_address(target) or "a new local instance"
    advice = f"{hint}, or start a local head with `archipelago cluster up`"
    if target and target not in ("auto", "local") and "://" not in target:
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot reach Ray at {where}: no Ray head answers there ({exc}); {advice}") from None
    for attempt in (1, 2):
        try:
            ray.init(address=target, **init_kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError from ray.init
            # A new local instance whose raylet missed Ray's fixed 30 s registration window (a loaded machine)
            # gets one more try; anything else is one line at once.
            if attempt == 1 and target in (None, "local") and "timed out during startup" in str(exc):
                ray.shutdown()
                continue
            raise ClusterError(f"cannot start or reach Ray ({where}): {failure_line(exc)}; {advice}") from None
    return True


def stale_bootstrap(temp_dir: str | None = None, timeout_s: float = 2.0) -> tuple[str, str] | None:
    """(file, address) when Ray's bootstrap file (<RAY_TMPDIR or /tmp>/ray/ray_current_cluster, written by
    `ray start`) names a head where nothing answers; None when there is no file or the head is up.

    `ray.init()` with no address connects to that address and, when the head died without `ray stop`
    (killed, OOM, a crash), retries its dead GCS for minutes with no message of ours.
    """
    try:
        from ray._common.utils import get_ray_address_file  # where this Ray version reads it from
        file = get_ray_address_file(temp_dir)
    except ImportError:
        root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        file = os.path.join(temp_dir or os.path.join(root, "ray"), "ray_current_cluster")
    try:
        recorded = Path(file).read_text().strip()
    except OSError:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
        return None
    except ValueError:
        return (file, recorded) if recorded else None
    except OSError:
        return file, recorded


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _tail(path: Path) -> str:
    try:
        return _last_line(path.read_text(errors="replace"))
    except OSError:
        return "no log"
