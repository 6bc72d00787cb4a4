"""The namespace cluster that `archipelago cluster local` manages from one process to the next: where its state
file lives, and bring-up / teardown / cleanup around it. Each call returns the line to print, so the CLI only
parses and echoes (the namespaces themselves are `netns.NetnsCluster`)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from archipelago.cluster.multisite import MultiSiteConfig, MultiSiteTestbed
from archipelago.cluster.netns import NetnsCluster, NetnsConfig, NetnsError, cleanup_stale

DEFAULT_STATE_FILE = Path("~/.archipelago/netns-cluster.json")


def state_path(state_file: str | Path | None = None) -> Path:
    """The state file: the given path, else $ARCHIPELAGO_NETNS_STATE, else ~/.archipelago/netns-cluster.json."""
    return Path(state_file or os.environ.get("ARCHIPELAGO_NETNS_STATE") or DEFAULT_STATE_FILE).expanduser()


def _recorded(path: Path) -> NetnsCluster | MultiSiteTestbed | None:
    """The cluster or multi-site testbed recorded in the state file, if any."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    if isinstance(state, dict) and state.get("kind") == "multisite":
        try:
            return MultiSiteTestbed.from_state(state)
        except (KeyError, TypeError) as exc:
            raise NetnsError(f"{path}: not a multi-site state file ({type(exc).__name__}: {exc}); remove leftovers "
                             f"with `archipelago cluster cleanup`") from None
    return NetnsCluster.from_state(path)


def sites_up(config: MultiSiteConfig, state_file: str | Path | None = None) -> str:
    """Start the multi-site testbed and record it, unless something recorded is still running."""
    path = state_path(state_file)
    running = _recorded(path)
    if running is not None and running.is_running():
        return f"already running: {running.prefix} (stop it first: archipelago cluster local --down)"
    tb = MultiSiteTestbed(config)
    t0 = time.perf_counter()
    tb.up()
    tb.save_state(path)
    return f"started {config.sites} sites in {time.perf_counter() - t0:.0f}s (state: {path})\n{tb.describe()}"


def sites_status(state_file: str | Path | None = None) -> str | None:
    """The recorded multi-site testbed with each site's liveness (its dashboard asked over the WAN); None when
    no testbed is recorded."""
    tb = _recorded(state_path(state_file))
    if not isinstance(tb, MultiSiteTestbed):
        return None
    if not tb.is_running():
        return f"multi-site testbed {tb.prefix} is recorded but not running (archipelago cluster local --down)"
    return tb.describe(probe=True)


def local_up(config: NetnsConfig, state_file: str | Path | None = None) -> str:
    """Start the namespace cluster and record it, unless the recorded one is still running."""
    path = state_path(state_file)
    recorded = _recorded(path)
    if isinstance(recorded, MultiSiteTestbed) and recorded.is_running():
        return f"already running: multi-site testbed {recorded.prefix}\n{recorded.describe()}"
    if isinstance(recorded, NetnsCluster):
        net = recorded
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
    net = _recorded(path)
    net.down()
    path.unlink(missing_ok=True)
    if isinstance(net, MultiSiteTestbed):
        return f"stopped multi-site testbed {net.prefix} ({net.config.sites} sites, services)"
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
