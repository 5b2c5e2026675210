"""The gateway: one ASGI app, the data plane in front of the management API."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from dcf import __version__, telemetry
from dcf.backends import create_backend
from dcf.gateway.api import build_router
from dcf.gateway.body_timeout import BodyClock
from dcf.gateway.jobs.api import Jobs, JobSettings
from dcf.gateway.lifecycle.autoscaler import Autoscaler
from dcf.gateway.lifecycle.functions import FunctionError, FunctionManager
from dcf.gateway.limits import Limits
from dcf.gateway.observe import tracing
from dcf.gateway.observe.logs import LogStore
from dcf.gateway.observe.metrics import Metrics
from dcf.gateway.openapi import install as install_openapi
from dcf.gateway.routing.invoke import ASYNC_PREFIX, PREFIX, Invoke
from dcf.gateway.routing.v2 import V2, is_v2
from dcf.gateway.rundir import RunDir
from dcf.gateway.security.admission import Admission, deploy_body_limit
from dcf.gateway.security.keys import Guard
from dcf.gateway.security.keys_api import build_keys_router

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 32 << 20


def freeze_heap() -> None:
    """Move everything alive after start-up out of the collector's reach.

    Otherwise each full collection under load rescans ~65,000 start-up objects
    (30-50 ms, freeing nothing): the gateway's p99 at 64 connections fell from
    ~38 ms to ~8 ms with this (bench/README.md).
    """
    gc.collect()
    gc.freeze()


@dataclass
class Settings:
    home: Path
    backend: str = "local"
    isolation: str = "process"
    token: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    flush_interval: float = 5.0
    ray_address: str | None = "auto"
    ray_namespace: str = "dcf"
    jobs: JobSettings = field(default_factory=JobSettings)
    limits: Limits = field(default_factory=Limits)
    tracing: telemetry.TraceSettings | None = None
    """Where spans go, and how many: None is tracing off."""


class Gateway:
    """Holds the gateway's parts and routes each request to the one that serves it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        private_dir(settings.home)
        self.metrics = Metrics()
        self.logs = LogStore(settings.home / "logs", follow_buffer=settings.limits.follow_buffer)
        self.run_dir = RunDir()  # and the run dirs of gateways that were killed, removed
        # Started first: a gateway that cannot trace as asked does not start at all.
        self.tracing = tracing.start(settings.tracing) if settings.tracing else None
        self.backend = create_backend(
            settings.backend,
            self.run_dir.path,
            settings.ray_address,
            settings.ray_namespace,
            settings.isolation,
            telemetry=telemetry.replica_environment(settings.tracing) if settings.tracing else None,
        )
        self.manager = FunctionManager(
            settings.home,
            self.backend,
            self.logs,
            self.metrics,
            settings.limits,
            isolation=settings.isolation,
        )
        self.body_clock = BodyClock(settings.limits.body_timeout)
        self.metrics.add_state_collector(self.manager.snapshot)
        self.guard = Guard(self.manager.registry)
        self.manager.on_spec = self.guard.set_policy
        self.jobs = Jobs(
            settings.home, self.manager, self.metrics, settings.max_body, settings.jobs
        )
        self.invoke = Invoke(
            self.manager.routes,
            self.metrics,
            settings.max_body,
            self.body_clock.guard(self.jobs),
            guard=self.guard,
            body_clock=self.body_clock,
        )
        self.v2 = V2(
            self.manager,
            self.metrics,
            settings.max_body,
            guard=self.guard,
            body_clock=self.body_clock,
        )
        # With tracing on, a span around each call (observe/tracing.py); off, nothing.
        self.data_plane = self.invoke if self.tracing is None else self.tracing.wrap(self.invoke)
        self.v2 = self.v2 if self.tracing is None else self.tracing.wrap(self.v2)
        self.api = self._build_api()
        # The token, then the body limit, before FastAPI reads a byte (admission.py).
        deploy_body = deploy_body_limit(settings.limits.max_upload, settings.max_body)
        self.admitted = Admission(self.api, settings.token, deploy_body)
        # Bodies must arrive within --body-timeout (body_timeout.py).
        self.admitted = self.body_clock.guard(self.admitted)
        self._tasks: list[asyncio.Task[None]] = []

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith(PREFIX) or path.startswith(ASYNC_PREFIX):
                await self.data_plane(scope, receive, send)
                return
            if is_v2(path):
                await self.v2(scope, receive, send)
                return
        await self.admitted(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        await self.manager.restore()
        await self.jobs.start()
        freeze_heap()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(Autoscaler(self.manager).run()),
            loop.create_task(self._flush_forever()),
        ]
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            self.manager.flush()
            await self.jobs.close()  # first: jobs in flight must not fail with their replicas
            await self.manager.close()
            await self.backend.close()
            self.run_dir.close()
            self.logs.close()
            if self.tracing is not None:
                self.tracing.close()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            self.manager.flush()
            self.metrics.tick(time.monotonic())

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="DCF gateway",
            version=__version__,
            description="Deploy deep-learning models as serverless functions.",
            lifespan=self.lifespan,
        )
        api.include_router(
            build_router(
                self.manager, self.settings.token, self.settings.backend, self.settings.isolation
            )
        )
        api.include_router(build_keys_router(self.manager, self.guard, self.settings.token))
        install_openapi(api, protected=self.settings.token is not None)  # openapi.py

        @api.exception_handler(FunctionError)
        async def function_error(request: Request, exc: FunctionError) -> JSONResponse:
            name = request.path_params.get("name")
            return JSONResponse({"error": exc.message, "function": name}, status_code=exc.status)

        @api.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            return JSONResponse(
                {"error": exc.detail, "function": request.path_params.get("name")},
                status_code=exc.status_code,
                headers=getattr(exc, "headers", None),
            )

        @api.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            return JSONResponse(
                {
                    "error": f"invalid request: {problems}",
                    "function": request.path_params.get("name"),
                },
                status_code=400,
            )

        @api.get("/healthz", summary="Liveness of the gateway")
        async def healthz() -> dict:
            return {"status": "ok", "functions": len(self.manager.functions)}

        @api.get("/metrics", summary="Prometheus metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @api.post(
            "/function/{name}",
            summary="Invoke a function",
            description="The body goes to the handler as bytes; its answer comes back as is. "
            "Errors are JSON {error, function}: 404 no such function, 413 body too large, "
            "429 queue full (Retry-After), 502 replica died, 503 no replica ready, 504 timeout.",
        )
        async def invoke_doc(name: str, request: Request) -> None:  # pragma: no cover
            """Served by the data plane before this router; listed here for the OpenAPI document."""

        if (STATIC / "index.html").exists():
            api.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")

            @api.get("/", include_in_schema=False)
            async def root() -> RedirectResponse:
                return RedirectResponse("/ui/")

        return api


def private_dir(path: Path) -> None:
    """The state directory, readable by its owner only (0700): it holds code, logs, secrets."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)


def create_app(settings: Settings) -> Gateway:
    return Gateway(settings)
