"""Several real hosts on one machine: Linux network namespaces joined by rate-limited links, one Ray node in
each, so island traffic and DistriFusion's overlap can be measured on a slow interconnect instead of loopback.

    namespace <prefix>-sw:  bridge br0 with ports p0 .. p{N-1}     (the "switch"; it has no IP address)
    namespace <prefix>-n<i>: eth0 = 10.213.0.<i+1>/24, lo           (node i; p<i> <-> eth0 is one veth pair)
                             tc tbf on eth0 (node -> switch) and on p<i> (switch -> node): one shaped link
                             Ray head (node 0) or worker, custom resource node_<i>, own --temp-dir

Nothing is created in the root namespace: every interface is created directly inside its namespace, the
subnet has no route outside them, and the nodes have no default route, so these addresses are contacted only
from inside namespaces this module created. Commands run on node i with `ip netns exec <prefix>-n<i> ...`.

Teardown never uses `ray stop` (it kills every Ray process on the machine, other users' included): the
processes of a node are exactly `ip netns pids <ns>`; they are killed, then the namespaces are deleted (which
destroys the veths and the bridge with them). `cleanup_stale(prefix)` does the same for leftovers of a crash.
Needs root, iproute2 (`ip`, `tc`) and the `sch_tbf` qdisc; netem is not required.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archipelago.cluster.local import ClusterError, _ray_exe

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

DEFAULT_PREFIX_ROOT = "arch"        # namespaces are <root>-<6 hex>-n<i> / -sw; `cleanup` matches on it
NODE_DEV = "eth0"                   # the node's end of its link (inside the node namespace)
BRIDGE = "br0"                      # the switch (inside the switch namespace)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "kibit": 2**10, "mibit": 2**20, "gibit": 2**30}


class NetnsError(ClusterError):
    """Network namespaces cannot be created, shaped, started or removed."""


# ----------------------------------------------------------------------------------------------------
# Config and small value types
# ----------------------------------------------------------------------------------------------------

@dataclass
class NetnsConfig:
    """A namespace cluster: N nodes on one switch, each link shaped to `link_rate` in both directions."""
    nodes: int = 3                       # namespaces n0..n{N-1}; n0 runs the Ray head
    link_rate: str | None = "1gbit"      # tc rate of each node's link ("100mbit", "1gbit"); None: unshaped
    subnet: str = "10.213.0.0/24"        # private; exists only inside the namespaces (node i = host i+1)
    prefix: str | None = None            # namespace name prefix; None: arch-<6 random hex>
    ray: bool = True                     # start Ray nodes (False: only the network, e.g. for link tests)
    num_cpus: int = 1                    # logical CPUs each Ray node offers (the machine may have only 2)
    object_store_mb: int = 200           # plasma store per node (/dev/shm is shared by every node)
    head_port: int = 6379                # GCS port of the head (inside n0: no clash with the root's Ray)
    include_dashboard: bool = False      # the head's dashboard (http://<head ip>:8265, for `ray job submit`)
    dashboard_port: int = 8265
    temp_root: str = "/tmp"              # Ray temp dirs <temp_root>/<prefix>/n<i>: short (unix socket limit)
    keep_logs: bool = False              # keep the Ray temp dirs (logs) after down()
    start_timeout_s: float = 180.0       # per `ray start` and for all nodes to register
    ray_args: list[str] = field(default_factory=list)  # more `ray start` flags for every node

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise NetnsError(f"nodes={self.nodes}: a namespace cluster needs at least 1 node")
        if parse_rate(self.link_rate) is None:
            self.link_rate = None
        net = _network(self.subnet)
        if self.object_store_mb < 75:
            raise NetnsError(f"object_store_mb={self.object_store_mb}: Ray needs at least 75 MiB per node")
        if self.nodes > net.num_addresses - 2:
            raise NetnsError(f"subnet {self.subnet} has room for {net.num_addresses - 2} nodes, not {self.nodes}")
        if self.prefix is not None and not re.fullmatch(r"[a-z][a-z0-9-]{1,30}", self.prefix):
            raise NetnsError(f"prefix {self.prefix!r}: use 2-31 characters of a-z, 0-9 and '-', starting with "
                             f"a letter")


@dataclass(frozen=True)
class LinkBytes:
    """Bytes that crossed one node's link, seen from the node."""
    sent: int          # node -> switch
    received: int      # switch -> node

    @property
    def total(self) -> int:
        return self.sent + self.received

    def __sub__(self, other: LinkBytes) -> LinkBytes:
        return LinkBytes(self.sent - other.sent, self.received - other.received)


def link_delta(before: dict[int, LinkBytes], after: dict[int, LinkBytes]) -> dict[int, LinkBytes]:
    """Per-node bytes between two `link_bytes()` snapshots (counters are cumulative since the link was made)."""
    return {i: after[i] - before[i] for i in after if i in before}


def parse_rate(rate: str | int | None) -> int | None:
    """A tc-style rate ("100mbit", "1.5gbit", "500kbit", or bits/s as a number) in bits/s; None/"none": unshaped.

    tc's own "bps" means *bytes* per second; it is refused here so that "100mbps" cannot silently be 8x off."""
    if rate is None or (isinstance(rate, str) and rate.strip().lower() in ("", "none", "off", "unlimited")):
        return None
    if isinstance(rate, int):
        value, unit = float(rate), "bit"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", rate.lower())
        if not m or (m.group(2) or "bit") not in _RATE_UNITS:
            raise NetnsError(f"link rate {rate!r}: use a number with one of {', '.join(_RATE_UNITS)} "
                             f"(e.g. 100mbit), or none")
        value, unit = float(m.group(1)), m.group(2) or "bit"
    bits = int(value * _RATE_UNITS[unit])
    if bits < 8000:
        raise NetnsError(f"link rate {rate!r} is below 8kbit: too slow for Ray's heartbeats")
    return bits


def _network(subnet: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise NetnsError(f"subnet {subnet!r}: {exc}") from None
    if not net.is_private:
        raise NetnsError(f"subnet {subnet}: must be a private range (RFC 1918), it is only ever used inside "
                         f"our namespaces")
    return net


def check_host() -> None:
    """One clear line when this machine cannot host namespace clusters (not root, no iproute2)."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (ip netns add / tc); run as root, e.g. in the CI "
                         "container or with sudo")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsError(f"`{tool}` not found: install iproute2 (apt-get install iproute2)")


# ----------------------------------------------------------------------------------------------------
# Thin wrappers over ip / tc
# ----------------------------------------------------------------------------------------------------

def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise NetnsError(f"`{argv[0]}` not found: install iproute2") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    if check and res.returncode != 0:
        msg = " ".join((res.stderr or res.stdout).split()) or f"exit code {res.returncode}"
        raise NetnsError(f"`{' '.join(argv)}` failed: {msg}")
    return res


def list_namespaces() -> list[str]:
    """Names of every named network namespace on this machine (`ip netns list`)."""
    out = _run(["ip", "-j", "netns", "list"]).stdout.strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns`: every Ray process a node started (and drivers run there)."""
    res = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, is as good as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill_namespaces(names: Sequence[str], grace_s: float = 5.0) -> int:
    """Stop every process in the namespaces; returns how many there were.

    In `ray stop`'s order, which matters: all raylets first (their workers and agents go with them), then
    everything else, then the GCS. SIGTERM to all of them at once leaves the GCS, the raylets and the
    autoscaler monitor each waiting on another for seconds. Each group gets SIGTERM, `grace_s`, then SIGKILL.
    """
    pids = [p for ns in names for p in namespace_pids(ns)]
    groups = [[p for p in pids if _comm(p) == "raylet"],
              [p for p in pids if _comm(p) not in ("raylet", "gcs_server")],
              [p for p in pids if _comm(p) == "gcs_server"]]
    for group in groups:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pid in group:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(_alive(p) for p in group):
                time.sleep(0.05)
            if not any(_alive(p) for p in group):
                break
    # Anything started meanwhile (a driver's new worker): no grace left.
    sigkill_namespaces(names)
    return len(pids)


def sigkill_namespaces(names: Sequence[str]) -> None:
    """SIGKILL every process in the namespaces at once, no handler runs: a power or network cut."""
    for pid in (p for ns in names for p in namespace_pids(ns)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_namespaces(names: Sequence[str]) -> None:
    """Kill the processes inside, then delete each namespace (its veth ends and bridge go with it)."""
    existing = set(list_namespaces())
    names = [ns for ns in names if ns in existing]
    kill_namespaces(names)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(namespace_pids(ns) for ns in names):
        time.sleep(0.1)
    left = [ns for ns in names if namespace_pids(ns)]
    if left:
        raise NetnsError(f"processes survive SIGKILL in {', '.join(left)} (pids "
                         f"{', '.join(str(p) for ns in left for p in namespace_pids(ns))}); not deleting")
    for ns in names:
        _run(["ip", "netns", "delete", ns])


def cleanup_stale(prefix: str = DEFAULT_PREFIX_ROOT + "-") -> list[str]:
    """Remove the namespaces a crashed harness left behind: every `<prefix>...-n<i>` / `-sw` namespace, its
    processes and its Ray temp dirs under /tmp. Returns the namespaces removed. `prefix` "arch-" (the default)
    matches every cluster of this module on the machine, running ones included."""
    check_host()
    names = [ns for ns in list_namespaces() if ns.startswith(prefix) and re.search(r"-(n\d+|sw|svc)$", ns)]
    delete_namespaces(names)
    for cluster_prefix in {re.sub(r"-(n\d+|sw)$", "", ns) if not ns.endswith("-svc") else ns for ns in names}:
        shutil.rmtree(Path("/tmp") / cluster_prefix, ignore_errors=True)
    return names


# ----------------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------------

class NetnsCluster:
    """N namespaces on one shaped switch, with a Ray node in each. Use as a context manager or up()/down():

        with NetnsCluster(NetnsConfig(nodes=3, link_rate="100mbit")) as net:
            with net.phase("train") as moved:      # bytes per link while the driver runs, in node 0
                subprocess.run(net.exec_argv(0, [sys.executable, "driver.py"]), env=net.driver_env())
            net.shape("1gbit")                       # re-shape every link in place

    Pin work to node i with the custom resource node_<i> (islands.per_island.<k>.resources.node_<i>=1).
    """

    def __init__(self, config: NetnsConfig | None = None) -> None:
        self.config = config or NetnsConfig()
        self.prefix = self.config.prefix or f"{DEFAULT_PREFIX_ROOT}-{secrets.token_hex(3)}"
        self.phases: dict[str, dict[int, LinkBytes]] = {}
        self.extra_env: dict[str, str] = {}     # more environment for every Ray node (never saved in the state)

    # ---- names and addresses ----------------------------------------------------------------------------
    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    @property
    def namespaces(self) -> list[str]:
        return [self.node_ns(i) for i in range(self.config.nodes)] + [self.switch_ns]

    def node_ip(self, i: int) -> str:
        return str(_network(self.config.subnet).network_address + i + 1)

    @property
    def head_address(self) -> str:
        """GCS address for ray.init(address=...) / RAY_ADDRESS, from inside any node namespace."""
        return f"{self.node_ip(0)}:{self.config.head_port}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://{self.node_ip(0)}:{self.config.dashboard_port}" if self.config.include_dashboard else None

    def temp_dir(self, i: int) -> Path:
        return Path(self.config.temp_root) / self.prefix / f"n{i}"

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` as a command that runs on node i (inside its namespace)."""
        return ["ip", "netns", "exec", self.node_ns(i), *argv]

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> NetnsCluster:
        """Create the namespaces, links and shaping, then start Ray; on any failure remove what was made."""
        check_host()
        clash = sorted(set(self.namespaces) & set(list_namespaces()))
        if clash:
            raise NetnsError(f"namespace {clash[0]} already exists; remove it with `archipelago cluster cleanup "
                             f"--prefix {self.prefix}`")
        try:
            self._make_network()
            self.shape(self.config.link_rate)
            if self.config.ray:
                self._start_ray()
        except BaseException:
            self.down(keep_logs=True)   # the error names a log under the temp dir: keep it
            raise
        return self

    def down(self, keep_logs: bool | None = None) -> None:
        """Kill every process in our namespaces (never `ray stop`), delete them and (unless keep_logs, default
        config.keep_logs) the Ray temp dirs."""
        check_host()
        delete_namespaces(self.namespaces)
        if not (self.config.keep_logs if keep_logs is None else keep_logs):
            shutil.rmtree(Path(self.config.temp_root) / self.prefix, ignore_errors=True)

    def _make_network(self) -> None:
        sw, plen = self.switch_ns, _network(self.config.subnet).prefixlen
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No IPv6 on the links: router solicitations and DAD would add noise to the byte counters.
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
                 check=False)
        _run(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
        for i in range(self.config.nodes):
            node, port = self.node_ns(i), f"p{i}"
            # Both ends are born inside their namespaces: the root namespace never sees a veth.
            _run(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", NODE_DEV, "netns", node])
            _run(["ip", "-n", sw, "link", "set", port, "master", BRIDGE])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            _run(["ip", "-n", node, "addr", "add", f"{self.node_ip(i)}/{plen}", "dev", NODE_DEV])
            _run(["ip", "-n", node, "link", "set", NODE_DEV, "up"])

    def shape(self, rate: str | int | None, nodes: Sequence[int] | None = None) -> None:
        """Set the rate of the given nodes' links (default: all), both directions; None removes the shaping.

        tbf's bucket is 4 ms of traffic (at least 32 KiB: a few full-size packets) and its queue holds 100 ms,
        so TCP sees a link of that rate rather than bursts and drops."""
        bits = parse_rate(rate)
        for i in range(self.config.nodes) if nodes is None else nodes:
            for ns, dev in ((self.node_ns(i), NODE_DEV), (self.switch_ns, f"p{i}")):
                if bits is None:
                    _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                    continue
                burst = max(32 * 1024, bits // 8 // 250)
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bits}bit",
                      "burst", str(burst), "latency", "100ms"])

    @property
    def auth_mode(self) -> str:
        """RAY_AUTH_MODE of every node: the caller's if set, else "disabled". With a token in ~/.ray, a bare
        `ray start --head` turns token auth on but `ray start --address` and `ray.init(address=...)` do not,
        so workers would be refused; the subnet is reachable only from inside our namespaces anyway."""
        return os.environ.get("RAY_AUTH_MODE") or "disabled"

    def driver_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a Ray driver or node inside a namespace: RAY_ADDRESS of the head, the auth mode,
        this interpreter's scripts first on PATH (a root-namespace RAY_ADDRESS would be unreachable)."""
        env = dict(os.environ if base is None else base)
        env.update({"RAY_ADDRESS": self.head_address, "RAY_AUTH_MODE": self.auth_mode,
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
        return env

    def start_ray(self, extra_env: dict[str, str] | None = None) -> None:
        """Start Ray on a network made with ray=False, every node with `extra_env` added (e.g. the endpoints
        and credentials of a site's store: Ray's workers and jobs inherit them from the node)."""
        self.extra_env = dict(extra_env or {})
        try:
            self._start_ray()
        except BaseException:
            self.down(keep_logs=True)
            raise

    def _ray_env(self) -> dict[str, str]:
        env = {**self.driver_env(), **self.extra_env}
        env.pop("RAY_ADDRESS")          # `ray start --head` would take it as the cluster to join
        return env

    def _ray_start_argv(self, i: int) -> list[str]:
        c = self.config
        argv = [_ray_exe(), "start", f"--node-ip-address={self.node_ip(i)}", f"--num-cpus={c.num_cpus}",
                f"--resources={json.dumps({f'node_{i}': 1})}", f"--object-store-memory={c.object_store_mb * 2**20}",
                f"--temp-dir={self.temp_dir(i)}", "--disable-usage-stats"]
        if i == 0:
            argv += ["--head", f"--port={c.head_port}"]
            if c.include_dashboard:
                argv += ["--include-dashboard=true", f"--dashboard-host={self.node_ip(0)}",
                         f"--dashboard-port={c.dashboard_port}"]
            else:
                argv += ["--include-dashboard=false"]
        else:
            argv += [f"--address={self.head_address}"]
        return argv + list(c.ray_args)

    def _start_ray(self) -> None:
        """`ray start` (daemonising, no --block) in each namespace: the head first, then the workers at once.

        A worker whose `ray start` fails is started once more, alone, after its namespace's processes are
        killed: Ray gives a raylet a fixed 30 s to register, which a loaded 2-core machine can miss."""
        env = self._ray_env()
        for i in range(self.config.nodes):
            self.temp_dir(i).mkdir(parents=True, exist_ok=True)
        for batch in ([0], list(range(1, self.config.nodes))):
            procs = {i: self._launch_ray(i, env) for i in batch}
            failed = {i: why for i in batch if (why := self._ray_started(i, procs[i])) is not None}
            for i, why in failed.items():
                if i == 0:
                    raise NetnsError(why)
                kill_namespaces([self.node_ns(i)])
                why = self._ray_started(i, self._launch_ray(i, env))
                if why is not None:
                    raise NetnsError(f"{why} (second try)")
        self.wait_for_nodes()

    def _launch_ray(self, i: int, env: dict[str, str]) -> subprocess.Popen:
        with open(self.temp_dir(i).parent / f"ray-start-n{i}.log", "wb") as log:
            return subprocess.Popen(self.exec_argv(i, self._ray_start_argv(i)), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)

    def _ray_started(self, i: int, proc: subprocess.Popen) -> str | None:
        """None once `ray start` on node i succeeded, else why not (one line naming its log)."""
        try:
            code = proc.wait(timeout=self.config.start_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        if code == 0:
            return None
        log_path = self.temp_dir(i).parent / f"ray-start-n{i}.log"
        return (f"`ray start` on node {i} ({self.node_ns(i)}) "
                f"{'timed out' if code is None else f'exited with code {code}'}: "
                f"{_last_error_line(log_path)} (log: {log_path})")

    def wait_for_nodes(self, timeout_s: float | None = None) -> None:
        """Block until the head's GCS lists every node alive (asked from inside node 0, the only place the
        head's address is reachable)."""
        probe = (f"import json, ray; ray.init(address={self.head_address!r}, logging_level='ERROR', "
                 f"log_to_driver=False); "
                 f"print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        deadline = time.monotonic() + (timeout_s or self.config.start_timeout_s)
        seen: list[str] = []
        while time.monotonic() < deadline:
            res = subprocess.run(self.exec_argv(0, [sys.executable, "-c", probe]), check=False,
                                 capture_output=True, text=True, env=self.driver_env(),
                                 timeout=max(1.0, deadline - time.monotonic()))
            lines = res.stdout.strip().splitlines()
            if res.returncode == 0 and lines:
                seen = json.loads(lines[-1])
                if len(seen) >= self.config.nodes:
                    return
            time.sleep(1.0)
        raise NetnsError(f"only {len(seen)} of {self.config.nodes} Ray nodes registered with the head "
                         f"{self.head_address} within the timeout (alive: {', '.join(seen) or 'none'}; logs under "
                         f"{Path(self.config.temp_root) / self.prefix})")

    # ---- measurement ------------------------------------------------------------------------------------
    def link_bytes(self) -> dict[int, LinkBytes]:
        """Cumulative bytes on every node's link, from the switch ports' veth counters (one `ip` call): what
        port p<i> received, node i sent, and vice versa."""
        out = _run(["ip", "-n", self.switch_ns, "-s", "-j", "link", "show"]).stdout
        stats = {d["ifname"]: d["stats64"] for d in json.loads(out) if "stats64" in d}
        return {i: LinkBytes(sent=int(stats[f"p{i}"]["rx"]["bytes"]), received=int(stats[f"p{i}"]["tx"]["bytes"]))
                for i in range(self.config.nodes)}

    @contextmanager
    def phase(self, name: str) -> Iterator[dict[int, LinkBytes]]:
        """Bytes per link while the block runs, recorded in `self.phases[name]` (and filled into the yielded
        dict when the block ends)."""
        before = self.link_bytes()
        moved: dict[int, LinkBytes] = {}
        try:
            yield moved
        finally:
            moved.update(link_delta(before, self.link_bytes()))
            self.phases[name] = dict(moved)

    # ---- state file (for `archipelago cluster local --down` from another process) ----------------------
    def state(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "config": asdict(self.config), "head_address": self.head_address,
                "auth_mode": self.auth_mode,
                "dashboard_url": self.dashboard_url,
                "nodes": [{"namespace": self.node_ns(i), "ip": self.node_ip(i), "resource": f"node_{i}",
                           "temp_dir": str(self.temp_dir(i))} for i in range(self.config.nodes)],
                "switch_namespace": self.switch_ns, "created_at": time.time()}

    def save_state(self, path: str | Path) -> Path:
        return write_state(path, self.state())

    @classmethod
    def from_state(cls, path: str | Path) -> NetnsCluster:
        p = Path(path).expanduser()
        try:
            state = json.loads(p.read_text())
            cluster = cls(NetnsConfig(**state["config"]))
            cluster.prefix = state["prefix"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise NetnsError(f"{p}: not a namespace-cluster state file ({type(exc).__name__}: {exc}); remove "
                             f"leftovers with `archipelago cluster cleanup`") from None
        return cluster

    def describe(self) -> str:
        """Where everything is and how to use it (printed by `archipelago cluster local`)."""
        c = self.config
        lines = [(f"links: {c.link_rate or 'unshaped'} each way; subnet {c.subnet} (exists only inside the "
                  f"namespaces)")]
        lines += [f"  node {i}: {self.node_ns(i):<16} {self.node_ip(i):<15} resource node_{i}"
                  f"{'  (Ray head)' if i == 0 else ''}" for i in range(c.nodes)]
        lines.append(f"head address (from inside a node): {self.head_address}"
                     + (f", dashboard {self.dashboard_url}" if self.dashboard_url else ""))
        pins = "".join(f" --set islands.per_island.{k}.resources.node_{(k + 1) % c.nodes}=1"
                       for k in range(min(2, c.nodes - 1)))
        lines.append(f"run on node 0: ip netns exec {self.node_ns(0)} env RAY_ADDRESS={self.head_address} "
                     f"RAY_AUTH_MODE={self.auth_mode} archipelago train --config configs/digits-quickstart.yaml"
                     f"{pins}")
        lines.append("stop: archipelago cluster local --down")
        return "\n".join(lines)

    def is_running(self) -> bool:
        """All our namespaces exist (Ray itself is not probed)."""
        return set(self.namespaces) <= set(list_namespaces())


def write_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a testbed's state file atomically (a reader never sees half of it); returns its path."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(p)
    return p


def _last_error_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if re.search(r"error|exception|failed", ln, re.IGNORECASE)]
    return (errors or lines or ["no output"])[-1][:300]
