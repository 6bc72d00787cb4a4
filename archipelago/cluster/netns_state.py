"""The namespace cluster that `archipelago cluster local` manages from one process to the next: where its state
file lives, and bring-up / teardown / cleanup around it. Each call returns the line to print, so the CLI only
parses and echoes (the namespaces themselves are `netns.NetnsCluster`)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from archipelago.cluster.netns import NetnsCluster, NetnsConfig, cleanup_stale

DEFAULT_STATE_FILE = Path("~/.archipelago/netns-cluster.json")


def state_path(state_file: str | Path | None = None) -> Path:
    """The state file: the given path, else $ARCHIPELAGO_NETNS_STATE, else ~/.archipelago/netns-cluster.json."""
    return Path(state_file or os.environ.get("ARCHIPELAGO_NETNS_STATE") or DEFAULT_STATE_FILE).expanduser()


def local_up(config: NetnsConfig, state_file: str | Path | None = None) -> str:
    """Start the namespace cluster and record it, unless the recorded one is still running."""
    path = state_path(state_file)
    if path.is_file():
        net = NetnsCluster.from_state(path)
        if net.is_running():
            return f"already running: namespace cluster {net.prefix}\n{net.describe()}"
    net = NetnsCluster(config)
    t0 = time.perf_counter()
    net.up()
    net.save_state(path)
    return (f"started {config.nodes} Ray nodes in network namespaces in {time.perf_counter() - t0:.0f}s "
            f"(state: {path})\n{net.describe()}")


def local_down(state_file: str | Path | None = None) -> str:
    """Tear down the recorded namespace cluster (only that one) and forget it."""
    path = state_path(state_file)
    if not path.is_file():
        return f"no namespace cluster recorded in {path}; nothing stopped (leftovers: `archipelago cluster cleanup`)"
    net = NetnsCluster.from_state(path)
    net.down()
    path.unlink(missing_ok=True)
    return f"stopped namespace cluster {net.prefix} ({net.config.nodes} nodes)"


def cleanup(prefix: str, state_file: str | Path | None = None) -> str:
    """Remove leftover namespaces starting with prefix; forget the recorded cluster if it was among them
    (or the state file is unreadable)."""
    removed = cleanup_stale(prefix)
    path = state_path(state_file)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text()).get("prefix", "")
        except (OSError, ValueError):
            recorded = ""
        if not recorded or recorded.startswith(prefix):
            path.unlink(missing_ok=True)
    return (f"removed {len(removed)} namespaces: {', '.join(removed)}" if removed
            else f"no namespaces starting with {prefix!r}")
