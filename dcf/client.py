"""A Python client of the gateway's HTTP API; the CLI is built on it and nothing else."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from dcf.config import FunctionSpec

DEFAULT_GATEWAY = "127.0.0.1:31113"
_SKIP = {"__pycache__", ".git", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


class GatewayError(Exception):
    """The gateway answered with an error; ``message`` is its explanation."""

    def __init__(self, status: int, message: str, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body


class GatewayUnreachable(GatewayError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach the DCF gateway at {url} ({reason})")
        self.url = url


def gateway_url(address: str | None) -> str:
    address = address or os.environ.get("DCF_GATEWAY") or DEFAULT_GATEWAY
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def pack(directory: Path) -> bytes:
    """The handler directory as a tar.gz, without caches and VCS folders."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if _SKIP.intersection(relative.parts) or path.suffix == ".pyc":
                continue
            tar.add(path, arcname=str(relative), recursive=False)
    return buffer.getvalue()


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
        if isinstance(payload, dict) and "error" in payload:
            return str(payload["error"])
    except ValueError:
        pass
    return response.text.strip() or f"HTTP {response.status_code}"


class Client:
    def __init__(
        self, gateway: str | None = None, token: str | None = None, timeout: float = 300.0
    ) -> None:
        self.url = gateway_url(gateway)
        token = token or os.environ.get("DCF_TOKEN")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GatewayUnreachable(self.url, type(exc).__name__) from None
        if response.status_code >= 400:
            raise GatewayError(response.status_code, _error_message(response), response.content)
        return response

    # management --------------------------------------------------------------

    def runtimes(self) -> list[dict]:
        return self._request("GET", "/system/runtimes").json()

    def list(self) -> list[dict]:
        return self._request("GET", "/system/functions").json()

    def info(self, name: str) -> dict:
        return self._request("GET", f"/system/function/{name}").json()

    def deploy(
        self,
        spec: FunctionSpec,
        directory: Path,
        update: bool = False,
        on_log: Callable[[str], None] | None = None,
        wait: bool = True,
    ) -> dict:
        """Upload and deploy; with ``wait`` return once it is Ready or Failed."""
        payload = {
            "function": spec.model_dump(mode="json"),
            "code": base64.b64encode(pack(directory)).decode(),
        }
        method = "PUT" if update else "POST"
        if not wait:
            return self._request(method, "/system/functions", json=payload).json()
        headers = {"accept": "application/x-ndjson"}
        try:
            with self._http.stream(
                method, "/system/functions", json=payload, headers=headers
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise GatewayError(response.status_code, _error_message(response))
                result: dict = {}
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if "log" in event and on_log is not None:
                        on_log(event["log"])
                    if "status" in event:
                        result = event
                return result
        except httpx.TransportError as exc:
            raise GatewayUnreachable(self.url, type(exc).__name__) from None

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/system/function/{name}")

    def scale(self, name: str, min_replicas: int | None, max_replicas: int | None) -> dict:
        body = {"min": min_replicas, "max": max_replicas}
        return self._request("POST", f"/system/function/{name}/scale", json=body).json()

    def logs(self, name: str, tail: int = 100) -> str:
        return self._request("GET", f"/system/function/{name}/logs", params={"tail": tail}).text

    def follow_logs(self, name: str, tail: int = 100) -> Iterator[str]:
        params = {"tail": tail, "follow": "true"}
        try:
            with self._http.stream(
                "GET", f"/system/function/{name}/logs", params=params, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise GatewayError(response.status_code, _error_message(response))
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise GatewayUnreachable(self.url, type(exc).__name__) from None

    # data plane ----------------------------------------------------------------

    def invoke(
        self, name: str, body: bytes = b"", query: dict | None = None, headers: dict | None = None
    ) -> httpx.Response:
        """Call a function; a non-2xx answer raises GatewayError with its message."""
        return self._request(
            "POST", f"/function/{name}", content=body, params=query, headers=headers
        )
