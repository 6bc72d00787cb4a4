"""`archipelago serve`: an ensemble behind HTTP on Ray Serve.

Deployments: `ingress` (FastAPI: checks each request, owns the sampling loop), `router`, and one `expert-k`
per expert, each with its own replicas (replica.py). The ingress runs `archipelago generate`'s code on a
`RemoteEnsemble` (remote.py), so a request gives generate's samples for the same arguments.

    POST /v1/generate  {"n": 4, "classes": [3, 1, 4, 1], "steps": 32, "cfg": 2.0, "seed": 0,
                        "routing": "top-1", "sampler": "euler", "output": "png" | "safetensors"}
    GET  /v1/info      experts, K, router, data manifest / config / ensemble hashes, limits, batching counters
    GET  /healthz      {"status": "ok"} (no token: for probes)
Every refusal is a 4xx with {"error": "<one line>"}; a model that does not answer in time is a 503.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request) at runtime.
import asyncio
import hmac
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from archipelago import storage
from archipelago.config import ServeConfig
from archipelago.errors import ArchipelagoError
from archipelago.serve.remote import BatchStats, Deadline, RemoteEnsemble, RemoteMember, Unavailable
from archipelago.serve.replica import ROUTER, deployment
from archipelago.serve.requests import RequestError, generate_defaults, parse_request

APP_NAME = "archipelago"
OUTPUTS = {"png": "image/png", "safetensors": "application/octet-stream"}

api = FastAPI(title="archipelago serve", docs_url=None, redoc_url=None, openapi_url=None)


class ApiError(Exception):
    """An HTTP error answered as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, str(exc.errors()[0].get("msg", "invalid request")))


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    from archipelago.errors import failure_line

    return _error(500, f"internal error: {failure_line(exc)}")


@serve.ingress(api)
class Ingress:
    """Checks requests, samples them (one thread each, so generate's loop runs unchanged) and answers."""

    def __init__(self, ensemble_url: str, serve_cfg: dict[str, Any], router: Any, experts: list[Any]):
        from archipelago.data.latents import decoder_for
        from archipelago.ensemble import verified_members
        from archipelago.router.train import read_router_meta

        self.url, self.cfg = ensemble_url, ServeConfig.model_validate(serve_cfg)
        spec, expert_urls, router_url, metas = verified_members(ensemble_url)
        self.spec, self.router, self.experts = spec, router, experts
        self.args = (metas[0].get("model") or {}).get("args", {})
        self.image_shape = tuple(metas[0].get("image_shape") or ())
        self.num_experts = int(read_router_meta(router_url)["num_experts"])
        self.codec = decoder_for(metas[0].get("data_space"), ensemble_url)
        self.token = os.environ.get(self.cfg.token_env or "", "") or None   # never logged nor echoed
        self.defaults, self.stats = generate_defaults(), BatchStats()
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrent, thread_name_prefix="sample")
        raw = storage.read_bytes(ensemble_url if ensemble_url.endswith(".json")
                                 else storage.join(ensemble_url, "ensemble.json"))
        self.info = {
            "name": spec.name, "ensemble": ensemble_url, "ensemble_sha256": storage.sha256_bytes(raw),
            "K": len(expert_urls), "experts": [{"id": k, "url": u} for k, u in sorted(expert_urls.items())],
            "router": router_url, "data_manifest_sha256": spec.data_manifest_sha256,
            "config_hash": spec.config_hash, "num_classes": int(self.args.get("num_classes", 0)),
            "image_shape": list(self.image_shape), "defaults": self.defaults,
            "limits": {"max_n": self.cfg.max_n, "max_steps": self.cfg.max_steps,
                       "max_body_bytes": self.cfg.max_body_bytes},
            "batching": {"max_size": self.cfg.batch_max_size, "wait_s": self.cfg.batch_wait_s,
                         "exact": self.cfg.exact},
            "auth": "bearer" if self.token else "none",
        }

    # --- checks -------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def _body(self, request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"content type {kind or 'none'!r}; send application/json")
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body of {declared} bytes is over the limit of {limit}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"body is over the limit of {limit} bytes")
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "the body must be a JSON object of request fields")
        return doc

    # --- sampling -----------------------------------------------------------------------------------
    def _ensemble(self, deadline: Deadline, routing: str) -> RemoteEnsemble:
        """A fresh RemoteEnsemble for one request (its routing mode and counters are the request's)."""
        members = {"stats": self.stats, "deadline": deadline}
        experts = [RemoteMember(f"expert-{k}", h, num_classes=self.info["num_classes"],
                                in_channels=self.args.get("in_channels"), input_size=self.args.get("input_size"),
                                **members) for k, h in enumerate(self.experts)]
        router = RemoteMember(ROUTER, self.router, num_experts=self.num_experts, **members)
        ens = RemoteEnsemble(experts, router, routing, class_counts=self.spec.shard_class_counts)
        ens.image_shape = self.image_shape or None
        return ens.eval()

    def _sample(self, req: Any, output: str, deadline: Deadline) -> tuple[bytes, int]:
        """(response bytes, expert calls): generate's code, the ensemble's members on their replicas."""
        from archipelago.generate import generate, picture_bytes, samples_bytes
        from archipelago.sampling_job import samples_meta

        ens = self._ensemble(deadline, req.routing)
        y = req.labels(ens.num_classes)
        x = generate(ens, req.n, cfg_scale=req.cfg, seed=req.seed, steps=req.steps, sampler=req.sampler,
                     classes=y, device="cpu")
        if output == "png":
            return picture_bytes(x if self.codec is None else self.codec.decode(x)), ens.expert_calls
        meta = {**samples_meta(self.url, req.routing, req.cfg, req.seed, req.steps, req.sampler),
                "expert_calls": ens.expert_calls}
        return samples_bytes(x, y, meta), ens.expert_calls

    # --- routes -------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/info")
    async def get_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {**self.info, "batching": {**self.info["batching"], **self.stats.summary()}}

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        self._authorize(request)
        doc = await self._body(request)
        output = doc.pop("output", "png")
        if output not in OUTPUTS:
            raise ApiError(422, f"output {output!r}; allowed: {' | '.join(OUTPUTS)}")
        try:
            req = parse_request(doc, self.defaults, self.cfg.max_n, self.cfg.max_steps, self.info["num_classes"],
                                self.num_experts, sample_once=self.spec.shard_class_counts is not None)
        except RequestError as exc:
            raise ApiError(422, str(exc)) from None
        deadline = Deadline(self.cfg.request_timeout_s, self.cfg.call_timeout_s)
        work = asyncio.get_running_loop().run_in_executor(self.pool, self._sample, req, output, deadline)
        try:
            body, calls = await asyncio.wait_for(work, timeout=self.cfg.request_timeout_s + 1.0)
        except (Unavailable, asyncio.TimeoutError) as exc:
            msg = str(exc) if isinstance(exc, Unavailable) else \
                f"no samples within the request timeout ({self.cfg.request_timeout_s:g} s); retry"
            raise ApiError(503, msg) from None
        except ArchipelagoError as exc:
            raise ApiError(500, str(exc)) from None
        return Response(content=body, media_type=OUTPUTS[output], headers={"X-Expert-Calls": str(calls)})


def build_app(ensemble_url: str, serve_cfg: ServeConfig) -> Any:
    """The bound Serve application: ingress -> router + one deployment per expert (verified first)."""
    from archipelago.ensemble import verified_members

    _, expert_urls, router_url, _ = verified_members(ensemble_url)
    experts = [deployment(f"expert-{k}", u, "expert", serve_cfg, serve_cfg.expert_replicas)
               for k, u in sorted(expert_urls.items())]
    router = deployment(ROUTER, router_url, ROUTER, serve_cfg, serve_cfg.router_replicas)
    ingress = serve.deployment(Ingress).options(
        name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2 * serve_cfg.max_concurrent,
        graceful_shutdown_timeout_s=serve_cfg.request_timeout_s)
    return ingress.bind(ensemble_url, serve_cfg.model_dump(mode="json"), router, experts)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder (`import_path: archipelago.serve.app:app_builder`, used by the Helm chart's
    RayService): args = {"ensemble": URL, "serve": {fields of the `serve:` config section}}."""
    if not isinstance(args, dict) or not args.get("ensemble"):
        raise ArchipelagoError("serve: the application args need 'ensemble' (the ensemble.json URL)")
    return build_app(str(args["ensemble"]), ServeConfig.model_validate(args.get("serve") or {}))
