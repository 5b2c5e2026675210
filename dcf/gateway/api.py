"""The management API under ``/system``: what the CLI, the client and the dashboard use."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from dcf import __version__
from dcf.config import RUNTIMES, ConfigError, parse_function
from dcf.gateway.lifecycle.functions import FunctionError, FunctionManager

NDJSON = "application/x-ndjson"


class DeployRequest(BaseModel):
    function: dict[str, Any] = Field(
        description="The function's config.yaml settings, with its name"
    )
    code: str = Field(description="The handler directory as a base64 tar.gz")
    canary: int | None = Field(
        None,
        strict=True,
        ge=1,
        le=99,
        description="Update as a canary rollout starting at this percent of calls (PUT only)",
    )


class RollbackRequest(BaseModel):
    to: int | None = Field(
        None,
        strict=True,
        ge=1,
        le=1_000_000_000,
        description="The kept version to serve (else the newest older)",
    )


class ScaleRequest(BaseModel):
    # Strict: the document says integer, so false or "2" is refused, not read as 0 or 2.
    min: int | None = Field(None, strict=True, description="Fewest replicas (0: scale to zero)")
    max: int | None = Field(None, strict=True, description="Most replicas")


def require_token(token: str | None):  # noqa: ANN201
    """A dependency refusing management calls without the gateway's bearer token."""

    async def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token):
            raise HTTPException(
                401,
                "this gateway needs a token: pass --token or set DCF_TOKEN",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def build_router(
    manager: FunctionManager, token: str | None, backend: str, isolation: str = "process"
) -> APIRouter:
    router = APIRouter(prefix="/system", dependencies=[Depends(require_token(token))])

    @router.get("/info", summary="Gateway version and backend")
    async def info() -> dict:
        return {
            "version": __version__,
            "backend": backend,
            "isolation": isolation,
            "functions": len(manager.functions),
        }

    @router.get("/runtimes", summary="Runtimes a function can use")
    async def runtimes() -> list[dict]:
        return [{"name": name, "description": desc} for name, desc in RUNTIMES.items()]

    @router.get("/functions", summary="All functions with status and counts")
    async def list_functions() -> list[dict]:
        return manager.list()

    async def deploy(request: Request, body: DeployRequest, update: bool) -> Response:
        name = str(body.function.get("name", ""))
        try:
            spec = parse_function({k: v for k, v in body.function.items() if k != "name"}, name)
        except ConfigError as exc:
            raise FunctionError(400, str(exc)) from None
        limit = manager.limits.max_upload
        if len(body.code) // 4 * 3 > limit + 2:  # refused before it is decoded
            raise FunctionError(
                413,
                f"function {name!r}: code archive is over the gateway's archive limit of"
                f" {limit} bytes (--max-upload)",
            )
        try:
            # In a thread, as the unpacking: tens of MB must not stall other requests.
            archive = await asyncio.to_thread(base64.b64decode, body.code, validate=True)
        except (binascii.Error, ValueError):
            raise FunctionError(400, "'code' is not valid base64") from None
        if body.canary is not None and not update:
            raise FunctionError(400, f"function {name!r}: a canary is for an update (PUT)")
        progress: asyncio.Queue[str] = asyncio.Queue()
        task = await manager.deploy(spec, archive, update, progress.put_nowait, body.canary)
        if NDJSON not in request.headers.get("accept", ""):
            return JSONResponse(manager.summary(name), status_code=202)
        return StreamingResponse(_progress(manager, name, task, progress), media_type=NDJSON)

    @router.post("/functions", status_code=202, summary="Deploy a new function")
    async def create(request: Request, body: DeployRequest) -> Response:
        """Refused with 409 if the name exists. With ``Accept: application/x-ndjson`` the
        build output and the final status stream back as JSON lines."""
        return await deploy(request, body, update=False)

    @router.put("/functions", status_code=202, summary="Deploy a new version of a function")
    async def update(request: Request, body: DeployRequest) -> Response:
        """The old version serves until the new one is ready; no call is dropped."""
        return await deploy(request, body, update=True)

    @router.get("/function/{name}", summary="One function in detail")
    async def get_function(name: str) -> dict:
        return manager.info(name)

    @router.delete("/function/{name}", summary="Remove a function and its replicas")
    async def delete_function(name: str) -> dict:
        await manager.delete(name)
        return {"deleted": name}

    @router.post("/function/{name}/scale", summary="Set replica bounds")
    async def scale(name: str, body: ScaleRequest) -> dict:
        return manager.scale(name, body.min, body.max)

    @router.get("/function/{name}/versions", summary="Kept versions, and which ones serve")
    async def versions(name: str) -> list[dict]:
        return manager.versions(name)

    @router.post("/function/{name}/rollback", summary="Serve a kept version again")
    async def rollback(name: str, body: RollbackRequest) -> dict:
        """No rebuild and no install: the version's code and cached build serve again, with
        the same switch as an update (no call fails). 404 for a version not kept, 409
        during a deploy or a rollout."""
        return await manager.rollback(name, body.to)

    @router.get("/function/{name}/rollout", summary="The canary rollout, or how the last ended")
    async def rollout(name: str) -> dict:
        return manager.rollout(name)

    @router.post("/function/{name}/rollout/promote", summary="Promote the canary now")
    async def promote(name: str) -> dict:
        """The canary takes every call and the stable version's replicas stop; 409 if no
        rollout is in progress."""
        return manager.decide(name, promote=True)

    @router.post("/function/{name}/rollout/abort", summary="Abort the rollout now")
    async def abort(name: str) -> dict:
        """Every call goes back to the stable version and the canary's replicas stop; 409 if
        no rollout is in progress."""
        return manager.decide(name, promote=False)

    @router.get("/function/{name}/logs", summary="Replica output and lifecycle events")
    async def logs(
        name: str,
        tail: int = Query(100, ge=0, le=100_000),
        follow: bool = Query(False),
    ) -> Response:
        manager.get(name)
        lines = manager.logs.tail(name, tail)
        if not follow:
            return Response("".join(line + "\n" for line in lines), media_type="text/plain")

        async def stream():  # noqa: ANN202
            for line in lines:
                yield line + "\n"
            async for line in manager.logs.follow(name):
                yield line + "\n"

        return StreamingResponse(stream(), media_type="text/plain")

    return router


async def _progress(
    manager: FunctionManager, name: str, task: asyncio.Task[None], queue: asyncio.Queue[str]
):  # noqa: ANN202
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield json.dumps({"log": getter.result()}) + "\n"
            continue
        getter.cancel()
        break
    while not queue.empty():
        yield json.dumps({"log": queue.get_nowait()}) + "\n"
    try:
        info = manager.info(name)
    except FunctionError:
        yield json.dumps({"status": "Deleted"}) + "\n"
        return
    yield json.dumps({"status": info["status"], "function": info}) + "\n"
