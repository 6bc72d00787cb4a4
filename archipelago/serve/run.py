"""Start (and stop) the Serve application of `archipelago serve` on a Ray cluster: a private local Ray by
default (never someone else's `ray start` head), or the cluster at --ray-address / $RAY_ADDRESS."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from archipelago.config import ServeConfig
from archipelago.errors import ConfigError


def serve_ensemble(ensemble_url: str, cfg: ServeConfig, echo: Callable[[str], None],
                   ray_address: str | None = None) -> None:
    """Verify the ensemble, deploy it, echo where it listens, and serve until SIGINT/SIGTERM."""
    from archipelago.ensemble import verified_members

    spec, expert_urls, _, _ = verified_members(ensemble_url)   # one EnsembleError line before Ray starts
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(cfg.token_env or ""):
        echo(f"warning: serving on {cfg.host} without a token (export {cfg.token_env or 'a token variable'})")
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from archipelago.serve.app import APP_NAME, build_app

    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    stop = _stop_on_signals()
    try:
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
        except (RayServeException, RuntimeError, OSError) as exc:   # port taken, proxy failed to bind: one line, not Ray's traceback
            raise ConfigError(f"serve: cannot listen on {cfg.host}:{cfg.port}: {str(exc).splitlines()[0]}") \
                from None
        serve.run(build_app(ensemble_url, cfg), name=APP_NAME, route_prefix="/", blocking=False)
        echo(f"serving {spec.name or 'ensemble'} (K={len(expert_urls)}) at http://{cfg.host}:{cfg.port}: "
             f"POST /v1/generate, GET /v1/info, GET /healthz; Ctrl-C stops")
        while not stop:
            time.sleep(0.5)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _stop_on_signals() -> list[int]:
    """A list that gets the signal number when SIGINT or SIGTERM arrives (the serve loop then winds down)."""
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda num, _frame: got.append(num))
    return got
