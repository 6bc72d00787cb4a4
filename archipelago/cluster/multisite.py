"""Several datacenters on one machine: N sites, each its own Ray cluster on its own switch, reachable from a
services namespace (the S3 endpoint, the MLflow server and the driver) only over one shaped "WAN" link each,
so islands that share nothing but storage can be run, measured and lost the way they would be deployed.

    <prefix>-svc                 moto_server :5000 + mlflow server :5001 (sqlite inside, HTTP outside), the driver;
                                 w<i> = 10.214.<i>.254/24, one leg on each site's subnet (no forwarding: sites
                                 never reach each other)
    <prefix>-s<i>-sw, -s<i>-n<j> site i = netns.NetnsCluster on 10.214.<i>.0/24 (head .1, dashboard :8265),
                                 its switch's bridge port `wan` <-> w<i> is the site's WAN link

Each WAN link is shaped in both directions by tbf (the rate), with an htb inside it that only classifies, so
`wan_bytes()` reads the bytes of each kind -- S3 (port 5000), MLflow (5001), Ray job control (8265), other --
from the class counters (this kernel has no iptables/nft counters or tc actions). Each site's Ray nodes get
the store and tracking endpoints as seen from that site, and the store credentials, in their environment
(the caller's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else moto's placeholders); the state file and every
printed line hold endpoints only, never a secret. Losing a site = `kill_site(i)`: its processes, then its
namespaces (and with them its WAN link). Needs root, like netns.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archipelago.cluster.netns import (
    DEFAULT_PREFIX_ROOT,
    NetnsCluster,
    NetnsConfig,
    NetnsError,
    _run,
    check_host,
    delete_namespaces,
    list_namespaces,
    parse_rate,
    sigkill_namespaces,
    write_state,
)

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

S3_PORT, MLFLOW_PORT, DASHBOARD_PORT = 5000, 5001, 8265
BUCKET = "archipelago"              # made by up(): s3://archipelago/<run> works at once
WAN_DEV = "wan"                     # the site switch's port towards the services namespace
KINDS = ("s3", "mlflow", "ray_jobs", "other")
_HTB_CLASS = {"s3": 10, "mlflow": 20, "ray_jobs": 30, "other": 40}
_PLACEHOLDER_KEYS = {"AWS_ACCESS_KEY_ID": "testbed", "AWS_SECRET_ACCESS_KEY": "testbed"}   # moto accepts any


@dataclass
class MultiSiteConfig:
    """A testbed of `sites` Ray clusters with `nodes_per_site` nodes each, behind WAN links of `wan_rate`."""
    sites: int = 2
    nodes_per_site: int = 2
    wan_rate: str | None = "50mbit"      # each site's link to the services namespace, both ways (None: unshaped)
    lan_rate: str | None = "1gbit"       # the links inside a site
    num_cpus: int = 1                    # logical CPUs per Ray node
    object_store_mb: int = 100
    subnet_prefix: str = "10.214"        # site i is <subnet_prefix>.<i>.0/24
    prefix: str | None = None            # arch-<6 hex> when None
    start_timeout_s: float = 240.0

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= 32:
            raise NetnsError(f"sites={self.sites}: use 1 to 32 sites")
        if not 1 <= self.nodes_per_site <= 200:
            raise NetnsError(f"nodes_per_site={self.nodes_per_site}: use 1 to 200 nodes per site")
        parse_rate(self.wan_rate)
        parse_rate(self.lan_rate)


class MultiSiteTestbed:
    """Sites + services + WAN links. `up()` / `down()`, or use as a context manager:

        with MultiSiteTestbed(MultiSiteConfig(sites=2, nodes_per_site=2, wan_rate="50mbit")) as tb:
            subprocess.run(tb.exec_argv(["archipelago", "train", "--config", "multisite.yaml"]), env=tb.driver_env())
            tb.kill_site(0)                     # a whole datacenter gone
    """

    def __init__(self, config: MultiSiteConfig | None = None) -> None:
        self.config = config or MultiSiteConfig()
        self.prefix = self.config.prefix or f"{DEFAULT_PREFIX_ROOT}-{secrets.token_hex(3)}"
        c = self.config
        self.sites = [NetnsCluster(NetnsConfig(
            nodes=c.nodes_per_site, link_rate=c.lan_rate, subnet=f"{c.subnet_prefix}.{i}.0/24",
            prefix=f"{self.prefix}-s{i}", ray=False, num_cpus=c.num_cpus, object_store_mb=c.object_store_mb,
            include_dashboard=True, dashboard_port=DASHBOARD_PORT, start_timeout_s=c.start_timeout_s))
            for i in range(c.sites)]
        self.lost: set[int] = set()
        self.timings: dict[str, float] = {}     # seconds from the start of the services/Ray bring-up

    # ---- names and addresses ----------------------------------------------------------------------------
    @property
    def services_ns(self) -> str:
        return f"{self.prefix}-svc"

    @property
    def services_dir(self) -> Path:
        return Path("/tmp") / self.services_ns

    def services_ip(self, site: int) -> str:
        """The services namespace's address on site `site`'s subnet (what that site's nodes call)."""
        return f"{self.config.subnet_prefix}.{site}.254"

    def dashboard_url(self, site: int) -> str:
        return f"http://{self.sites[site].node_ip(0)}:{DASHBOARD_PORT}"

    @property
    def namespaces(self) -> list[str]:
        return [ns for s in self.sites for ns in s.namespaces] + [self.services_ns]

    def exec_argv(self, argv: list[str]) -> list[str]:
        """`argv` as a command in the services namespace (the driver's place: it reaches every site)."""
        return ["ip", "netns", "exec", self.services_ns, *argv]

    @staticmethod
    def _credentials() -> dict[str, str]:
        return {k: os.environ.get(k) or v for k, v in _PLACEHOLDER_KEYS.items()}

    def site_env(self, site: int) -> dict[str, str]:
        """Endpoints (and credentials) as site `site`'s processes see them."""
        ip = self.services_ip(site)
        return {"AWS_ENDPOINT_URL": f"http://{ip}:{S3_PORT}", "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_TRACKING_URI": f"http://{ip}:{MLFLOW_PORT}", "OMP_NUM_THREADS": "1",
                **self._credentials()}

    def driver_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for `archipelago train` in the services namespace: the local endpoints, no RAY_ADDRESS
        (the driver's own Ray is local; the sites are reached by job submission only)."""
        env = {k: v for k, v in dict(os.environ if base is None else base).items()
               if not k.startswith(("RAY_ADDRESS", "MLFLOW_RUN_ID"))}
        env.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_DEFAULT_REGION": "us-east-1",
                    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{MLFLOW_PORT}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "disabled",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                    **self._credentials()})
        return env

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> MultiSiteTestbed:
        """Namespaces, links and shaping; then moto + MLflow and every site's Ray at once. On any failure
        everything made so far is removed."""
        check_host()
        taken = set(list_namespaces()) & set(self.namespaces)
        if taken:
            raise NetnsError(f"namespaces {', '.join(sorted(taken))} exist already; remove them with "
                             f"`archipelago cluster cleanup --prefix {self.prefix}`")
        try:
            _run(["ip", "netns", "add", self.services_ns])
            _run(["ip", "-n", self.services_ns, "link", "set", "lo", "up"])
            _run(["ip", "netns", "exec", self.services_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=False)
            for i, site in enumerate(self.sites):
                site.up()                      # network only (ray=False): Ray starts below, with its env
                self._make_wan(i)
            self.shape_wan(self.config.wan_rate)
            self.services_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()

            def timed(name: str, fn: Any, *args: Any) -> None:
                fn(*args)
                self.timings[name] = round(time.perf_counter() - t0, 1)

            with ThreadPoolExecutor(max_workers=1 + len(self.sites)) as pool:
                jobs = [pool.submit(timed, "services_s", self._start_services)]
                jobs += [pool.submit(timed, f"site{i}_ray_s", site.start_ray, self.site_env(i))
                         for i, site in enumerate(self.sites)]
                for job in jobs:
                    job.result()
        except BaseException:
            self.down(keep_logs=True)
            raise
        return self

    def down(self, keep_logs: bool = False) -> None:
        """Every process in our namespaces, then the namespaces and (unless keep_logs) the temp dirs."""
        check_host()
        for i, site in enumerate(self.sites):
            if i not in self.lost:
                site.down(keep_logs=keep_logs)
        delete_namespaces([self.services_ns])
        if not keep_logs:
            shutil.rmtree(self.services_dir, ignore_errors=True)

    def kill_site(self, site: int, hard: bool = False) -> float:
        """Lose site `site` whole: kill every process in its namespaces, then delete them (its WAN link goes
        with them). Returns the seconds it took. Default: SIGTERM then SIGKILL, as an orderly shutdown does
        (a trainer gets to write its preemption checkpoint); hard: SIGKILL to every process at once, as a power
        or network cut does (nothing runs a handler)."""
        t0 = time.perf_counter()
        if hard:
            sigkill_namespaces(self.sites[site].namespaces)
        self.sites[site].down(keep_logs=False)
        self.lost.add(site)
        return time.perf_counter() - t0

    def _make_wan(self, i: int) -> None:
        sw, svc, dev = self.sites[i].switch_ns, self.services_ns, f"w{i}"
        _run(["ip", "-n", sw, "link", "add", WAN_DEV, "type", "veth", "peer", "name", dev, "netns", svc])
        _run(["ip", "-n", sw, "link", "set", WAN_DEV, "master", "br0"])
        _run(["ip", "-n", sw, "link", "set", WAN_DEV, "up"])
        _run(["ip", "-n", svc, "addr", "add", f"{self.services_ip(i)}/24", "dev", dev])
        _run(["ip", "-n", svc, "link", "set", dev, "up"])

    def _wan_ends(self, i: int) -> list[tuple[str, str, str]]:
        """(namespace, device, direction) of both ends of site i's WAN link; direction = where packets go."""
        return [(self.services_ns, f"w{i}", "to_site"), (self.sites[i].switch_ns, WAN_DEV, "from_site")]

    def shape_wan(self, rate: str | int | None) -> None:
        """(Re)shape every live site's WAN link to `rate` both ways; the per-kind counters restart at 0."""
        bits = parse_rate(rate)
        for i in range(len(self.sites)):
            if i in self.lost:
                continue
            for ns, dev, direction in self._wan_ends(i):
                _shape_and_classify(ns, dev, bits, direction)

    def wan_bytes(self) -> dict[int, dict[str, dict[str, int]]]:
        """{site: {kind: {"to_site": bytes, "from_site": bytes}}} since the last shape_wan (live sites)."""
        out: dict[int, dict[str, dict[str, int]]] = {}
        for i in range(len(self.sites)):
            if i in self.lost:
                continue
            per = out.setdefault(i, {k: {"to_site": 0, "from_site": 0} for k in KINDS})
            for ns, dev, direction in self._wan_ends(i):
                # `tc -j` prints no JSON for classes here: read "class htb 10:<id> ...\n Sent <n> bytes".
                text = _run(["tc", "-n", ns, "-s", "class", "show", "dev", dev]).stdout
                by_id = {m.group(1): int(m.group(2))
                         for m in re.finditer(r"class htb (10:\d+) [^\n]*\n\s*Sent (\d+) bytes", text)}
                for kind, cid in _HTB_CLASS.items():
                    per[kind][direction] = by_id.get(f"10:{cid}", 0)
        return out

    def _start_services(self) -> None:
        """moto_server and `mlflow server` (sqlite backend, local artifacts) in the services namespace,
        listening on every leg; returns once both answer and the bucket exists."""
        d, env = self.services_dir, self.driver_env()
        bindir = Path(sys.executable).parent
        moto = shutil.which("moto_server", path=str(bindir)) or shutil.which("moto_server")
        mlflow = shutil.which("mlflow", path=str(bindir)) or shutil.which("mlflow")
        if not moto or not mlflow:
            raise NetnsError("moto_server or mlflow not installed: pip install 'moto[server]' mlflow (dev extra)")
        argvs = {"moto": [moto, "-H", "0.0.0.0", "-p", str(S3_PORT)],
                 "mlflow": [mlflow, "server", "--host", "0.0.0.0", "--port", str(MLFLOW_PORT), "--workers", "1",
                            "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                            "--artifacts-destination", str(d / "mlartifacts")]}
        for name, argv in argvs.items():
            with open(d / f"{name}.log", "wb") as log:
                subprocess.Popen(self.exec_argv(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        probe = ("import sys, time, urllib.request, boto3\n"
                 "deadline = time.time() + float(sys.argv[1])\n"
                 "while True:\n"
                 "    try:\n"
                 f"        urllib.request.urlopen('http://127.0.0.1:{MLFLOW_PORT}/health', timeout=5)\n"
                 f"        s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{S3_PORT}', region_name='us-east-1')\n"
                 f"        s3.create_bucket(Bucket='{BUCKET}')\n"
                 "        break\n"
                 "    except Exception as exc:\n"
                 "        if time.time() > deadline: sys.exit(f'{type(exc).__name__}: {exc}')\n"
                 "        time.sleep(0.5)\n")
        res = subprocess.run(self.exec_argv([sys.executable, "-c", probe, str(self.config.start_timeout_s)]),
                             env=env, capture_output=True, text=True, check=False,
                             timeout=self.config.start_timeout_s + 30)
        if res.returncode != 0:
            raise NetnsError(f"the services (moto_server, mlflow server) did not come up: "
                             f"{(res.stderr.strip().splitlines() or ['no output'])[-1][:300]} (logs under {d})")

    # ---- state file and description ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"kind": "multisite", "prefix": self.prefix, "config": asdict(self.config),
                "lost": sorted(self.lost), "services_namespace": self.services_ns,
                "s3_endpoint": f"http://127.0.0.1:{S3_PORT}", "mlflow": f"http://127.0.0.1:{MLFLOW_PORT}",
                "sites": [{"site": i, "dashboard": self.dashboard_url(i), "namespaces": s.namespaces}
                          for i, s in enumerate(self.sites)], "created_at": time.time()}

    def save_state(self, path: str | Path) -> Path:
        return write_state(path, self.state())

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MultiSiteTestbed:
        tb = cls(MultiSiteConfig(**{**state["config"], "prefix": state["prefix"]}))   # names from the prefix
        tb.lost = set(state.get("lost", []))
        return tb

    def is_running(self) -> bool:
        return self.services_ns in list_namespaces()

    def site_alive(self, site: int) -> bool:
        """The site's namespaces exist and its dashboard answers (asked from the services namespace)."""
        if not set(self.sites[site].namespaces) <= set(list_namespaces()):
            return False
        probe = f"import urllib.request; urllib.request.urlopen('{self.dashboard_url(site)}/api/version', timeout=5)"
        res = subprocess.run(self.exec_argv([sys.executable, "-c", probe]), capture_output=True, check=False,
                             timeout=30)
        return res.returncode == 0

    def describe(self, probe: bool = False) -> str:
        """Sites, endpoints and how to run the pipeline across them (printed by `cluster local --sites`)."""
        c = self.config
        lines = [(f"multi-site testbed {self.prefix}: {c.sites} sites x {c.nodes_per_site} nodes, WAN "
                 f"{c.wan_rate or 'unshaped'} each way per site, LAN {c.lan_rate or 'unshaped'}"),
                 (f"services ({self.services_ns}): S3 http://127.0.0.1:{S3_PORT} (bucket {BUCKET}), MLflow "
                 f"http://127.0.0.1:{MLFLOW_PORT}; site i reaches them at {c.subnet_prefix}.<i>.254")]
        for i in range(c.sites):
            state = "LOST" if i in self.lost else ("up" if not probe or self.site_alive(i) else "DOWN")
            lines.append(f"  site {i}: {state:<4} dashboard {self.dashboard_url(i)}  namespaces "
                         f"{self.sites[i].node_ns(0)}..{self.sites[i].node_ns(c.nodes_per_site - 1)}")
        sets = " ".join(f"--set islands.per_island.{i}.address={self.dashboard_url(i)}" for i in range(c.sites))
        lines.append(f"run the driver: ip netns exec {self.services_ns} env AWS_ENDPOINT_URL=http://127.0.0.1:"
                     f"{S3_PORT} MLFLOW_TRACKING_URI=http://127.0.0.1:{MLFLOW_PORT} archipelago train --config "
                     f"configs/digits-quickstart.yaml --set storage.root=s3://{BUCKET}/run --set "
                     f"data.num_clusters={c.sites} {sets}")
        lines.append("(the driver needs the same AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY as this command had; moto "
                     "accepts any)")
        lines.append("stop: archipelago cluster local --down")
        return "\n".join(lines)


def _shape_and_classify(ns: str, dev: str, bits: int | None, direction: str) -> None:
    """tbf at `bits` (none: unshaped) with an htb inside that only sorts packets into one class per kind."""
    _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
    tc = ["tc", "-n", ns]
    if bits is not None:
        burst = max(32 * 1024, bits // 8 // 250)
        _run([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", f"{bits}bit", "burst",
              str(burst), "latency", "100ms"])
        parent = ["parent", "1:1"]
    else:
        parent = ["root"]
    _run([*tc, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "htb", "default", "40"])
    _run([*tc, "class", "add", "dev", dev, "parent", "10:", "classid", "10:1", "htb", "rate", "10gbit",
          "quantum", "60000"])
    for cid in _HTB_CLASS.values():
        _run([*tc, "class", "add", "dev", dev, "parent", "10:1", "classid", f"10:{cid}", "htb", "rate", "2gbit",
              "ceil", "10gbit", "quantum", "60000"])
    # Services -> site: S3 and MLflow answer from their ports, the driver calls the dashboard's; the reverse
    # on the site's side.
    service_side = direction == "to_site"
    rules = [("s3", "sport" if service_side else "dport", S3_PORT),
             ("mlflow", "sport" if service_side else "dport", MLFLOW_PORT),
             ("ray_jobs", "dport" if service_side else "sport", DASHBOARD_PORT)]
    for prio, (kind, field, port) in enumerate(rules, start=1):
        _run([*tc, "filter", "add", "dev", dev, "parent", "10:", "protocol", "ip", "prio", str(prio), "u32",
              "match", "ip", field, str(port), "0xffff", "flowid", f"10:{_HTB_CLASS[kind]}"])
