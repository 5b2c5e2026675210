"""``/system/function/{name}/keys``: make, list and revoke a function's keys (keys.py).

Token-protected like the rest of ``/system``. A key is in the answer that
makes it and nowhere else: the list shows ids, rates and states only.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from dcf.gateway.api import require_token
from dcf.gateway.lifecycle.functions import FunctionError, FunctionManager
from dcf.gateway.security.keys import Guard, Key, TooManyKeys

_ERRORS = {
    400: {"description": "Malformed request (e.g. a rate that is not one)"},
    401: {"description": "Missing or wrong admin token"},
    404: {"description": "No such function (or key)"},
}
_CREATE_ERRORS = {**_ERRORS, 409: {"description": "The function has 1000 active keys already"}}


class KeyRequest(BaseModel):
    rate: str | None = Field(
        None, description="Rate limit of the key, e.g. 5/s, 100/m, 1000/h; none if absent"
    )


class KeyInfo(BaseModel):
    id: str = Field(description="Public id of the key: what list shows and revoke takes")
    function: str
    rate: str | None
    created_at: float
    revoked: bool
    revoked_at: float | None


class NewKey(KeyInfo):
    key: str = Field(description="The key itself, shown this once: callers send X-DCF-Key")
    required: bool = Field(description="Whether the function asks for keys (auth: key)")


def build_keys_router(manager: FunctionManager, guard: Guard, token: str | None) -> APIRouter:
    router = APIRouter(prefix="/system", dependencies=[Depends(require_token(token))])

    @router.post(
        "/function/{name}/keys",
        status_code=201,
        summary="Make a key for a function",
        responses=_CREATE_ERRORS,
    )
    async def create_key(name: str, body: KeyRequest) -> NewKey:
        """The answer holds the key, shown this once; the gateway keeps only its SHA-256."""
        manager.get(name)
        try:
            key, secret = guard.create(name, body.rate)
        except ValueError as exc:
            raise FunctionError(400, str(exc)) from None
        except TooManyKeys as exc:
            raise FunctionError(409, str(exc)) from None
        return NewKey(**key.public(), key=secret, required=guard.requires_key(name))

    @router.get("/function/{name}/keys", summary="A function's keys", responses=_ERRORS)
    async def list_keys(name: str) -> list[KeyInfo]:
        manager.get(name)
        return [KeyInfo(**key.public()) for key in guard.list(name)]

    @router.delete(
        "/function/{name}/keys/{key_id}", summary="Revoke a function's key", responses=_ERRORS
    )
    async def revoke_key(name: str, key_id: str) -> KeyInfo:
        """Calls with the key get 401 from now on; the key stays listed as revoked."""
        manager.get(name)
        key: Key | None = guard.revoke(name, key_id)
        if key is None:
            raise FunctionError(404, f"function {name!r} has no key {key_id!r}")
        return KeyInfo(**key.public())

    return router
