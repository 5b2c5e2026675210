"""A Python client of the gateway's HTTP API; the CLI is built on it and nothing else.

It speaks HTTP with the standard library's http.client: importing httpx takes
about 0.1 s, most of what ``dcf function call`` may take from start to answer,
and one keep-alive connection is all a client needs.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:
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
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if _SKIP.intersection(relative.parts) or path.suffix == ".pyc":
                continue
            tar.add(path, arcname=str(relative), recursive=False)
    return buffer.getvalue()


@dataclass
class Response:
    """An answer of the gateway, read in full (attributes named as in httpx)."""

    status_code: int
    headers: http.client.HTTPMessage  # case-insensitive: headers["content-type"]
    content: bytes

    @property
    def text(self) -> str:
        charset = self.headers.get_content_charset() or "utf-8"
        return self.content.decode(charset, errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _error_message(response: Response) -> str:
    try:
        payload = response.json()
        if isinstance(payload, dict) and "error" in payload:
            return str(payload["error"])
    except ValueError:
        pass
    return response.text.strip() or f"HTTP {response.status_code}"


class Client:
    """One gateway. The admin ``token`` goes to /system and /metrics only, never with a call,
    so a handler never sees it; a function ``key`` goes with calls only."""

    def __init__(
        self,
        gateway: str | None = None,
        token: str | None = None,
        timeout: float = 300.0,
        key: str | None = None,
    ) -> None:
        self.url = gateway_url(gateway)
        self.timeout = timeout
        token = token or os.environ.get("DCF_TOKEN")
        key = key or os.environ.get("DCF_KEY")
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._call_headers = {"x-dcf-key": key} if key else {}
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # management --------------------------------------------------------------

    def runtimes(self) -> list[dict]:
        return self._request("GET", "/system/runtimes").json()

    def list(self) -> list[dict]:
        return self._request("GET", "/system/functions").json()

    def info(self, name: str) -> dict:
        return self._request("GET", _system(name)).json()

    def deploy(
        self,
        spec: FunctionSpec,
        directory: Path,
        update: bool = False,
        on_log: Callable[[str], None] | None = None,
        wait: bool = True,
        canary: int | None = None,
    ) -> dict:
        """Upload and deploy; with ``wait`` return once it is Ready or Failed. ``canary``:
        an update rolled out from that percent of calls (the gateway judges each step)."""
        payload: dict[str, Any] = {
            # What the config says, not every default: a gateway of an older release
            # refuses the keys it does not know, even those this config never set.
            "function": spec.model_dump(mode="json", exclude_defaults=True),
            "code": base64.b64encode(pack(directory)).decode(),
        }
        if canary is not None:
            payload["canary"] = canary
        method = "PUT" if update else "POST"
        if not wait:
            return self._request(method, "/system/functions", json=payload).json()
        result: dict = {}
        headers = {"accept": "application/x-ndjson"}
        with self._stream(
            method, "/system/functions", json=payload, headers=headers, timeout=self.timeout
        ) as lines:
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                if "log" in event and on_log is not None:
                    on_log(event["log"])
                if "status" in event:
                    result = event
        return result

    def delete(self, name: str) -> None:
        self._request("DELETE", _system(name))

    def scale(self, name: str, min_replicas: int | None, max_replicas: int | None) -> dict:
        body = {"min": min_replicas, "max": max_replicas}
        return self._request("POST", _system(name, "/scale"), json=body).json()

    def versions(self, name: str) -> list[dict]:
        return self._request("GET", _system(name, "/versions")).json()

    def rollback(self, name: str, to: int | None = None) -> dict:
        """Serve a kept version again (the newest older one without ``to``); its info."""
        return self._request("POST", _system(name, "/rollback"), json={"to": to}).json()

    def rollout(self, name: str, decide: str | None = None) -> dict:
        """The rollout's state; ``decide`` "promote" or "abort" ends it by hand first."""
        if decide is None:
            return self._request("GET", _system(name, "/rollout")).json()
        return self._request("POST", _system(name, f"/rollout/{decide}")).json()

    def create_key(self, name: str, rate: str | None = None) -> dict:
        """A new key for ``name``: the answer holds the key itself, shown this once."""
        return self._request("POST", _system(name, "/keys"), json={"rate": rate}).json()

    def list_keys(self, name: str) -> list[dict]:
        return self._request("GET", _system(name, "/keys")).json()

    def revoke_key(self, name: str, key_id: str) -> dict:
        return self._request("DELETE", _system(name, f"/keys/{quote(key_id, safe='')}")).json()

    def logs(self, name: str, tail: int = 100) -> str:
        return self._request("GET", _system(name, "/logs"), params={"tail": tail}).text

    def follow_logs(self, name: str, tail: int = 100) -> Iterator[str]:
        params = {"tail": tail, "follow": "true"}
        with self._stream("GET", _system(name, "/logs"), params=params, timeout=None) as lines:
            yield from lines

    # data plane ----------------------------------------------------------------

    def invoke(
        self, name: str, body: bytes = b"", query: dict | None = None, headers: dict | None = None
    ) -> Response:
        """Call a function; a non-2xx answer raises GatewayError with its message.

        ``name`` may go on with a path for the handler (``name/sub/path``).
        """
        return self._request(
            "POST", f"/function/{quote(name, safe='/')}", body=body, params=query, headers=headers
        )

    @contextlib.contextmanager
    def invoke_stream(
        self, name: str, body: bytes = b"", query: dict | None = None, headers: dict | None = None
    ) -> Iterator[Iterator[bytes]]:
        """Call a function and read its answer as it arrives: a streamed answer item by
        item, any other in one piece. A non-2xx answer raises GatewayError, as ``invoke``;
        a stream that breaks off raises GatewayError after the items that came."""
        path, body, headers = self._prepare(
            f"/function/{quote(name, safe='/')}", body, None, query, headers
        )
        conn = self._connect(self.timeout)
        try:
            raw = self._send(conn, "POST", path, body, headers)
            if raw.status >= 400:
                error = self._read(raw)
                raise GatewayError(raw.status, _error_message(error), error.content)
            yield _chunks(raw, name)
        finally:
            conn.close()

    def invoke_async(
        self,
        name: str,
        body: bytes = b"",
        query: dict | None = None,
        headers: dict | None = None,
        callback_url: str | None = None,
    ) -> str:
        """Submit a job (stored by the gateway before it answers); returns its id.

        With ``callback_url`` the gateway POSTs the answer there when the job is done.
        """
        headers = dict(headers or {})
        if callback_url:
            headers["X-Callback-Url"] = callback_url
        response = self._request(
            "POST",
            f"/async-function/{quote(name, safe='/')}",
            body=body,
            params=query,
            headers=headers,
        )
        return str(response.json()["id"])

    def job(self, job_id: str) -> Response:
        """A job's answer once done (a non-2xx one raises GatewayError, as ``invoke``), else
        its state: 202, ``X-DCF-Job-Status: queued`` or ``running``. Gone: 410, unknown: 404."""
        return self._request("GET", f"/async-function/jobs/{quote(job_id, safe='')}")

    def wait_job(self, job_id: str, timeout: float | None = None) -> Response:
        """Poll until the job is done (or failed, which raises GatewayError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.05
        while True:
            response = self.job(job_id)
            state = response.headers.get("x-dcf-job-status")
            if state not in ("queued", "running"):
                return response
            if deadline is not None and time.monotonic() + interval > deadline:
                raise GatewayError(0, f"job {job_id} is still {state} after {timeout:g}s")
            time.sleep(interval)
            interval = min(interval * 2, 1.0)

    # HTTP ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        json: Any = None,
        params: dict | None = None,
        headers: dict | None = None,
    ) -> Response:
        """One exchange on the kept-alive connection; a non-2xx answer raises GatewayError."""
        path, body, headers = self._prepare(path, body, json, params, headers)
        conn = self._conn
        if conn is None or _closed_by_peer(conn):
            self.close()
            conn = self._conn = self._connect(self.timeout)
        try:
            raw = self._send(conn, method, path, body, headers)
            response = self._read(raw)
        except BaseException:
            self.close()
            raise
        if raw.will_close:
            self.close()
        if response.status_code >= 400:
            raise GatewayError(response.status_code, _error_message(response), response.content)
        return response

    @contextlib.contextmanager
    def _stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict | None = None,
        headers: dict | None = None,
        timeout: float | None,
    ) -> Iterator[Iterator[str]]:
        """An answer read line by line as it arrives, on a connection of its own."""
        path, body, headers = self._prepare(path, b"", json, params, headers)
        conn = self._connect(timeout)
        try:
            raw = self._send(conn, method, path, body, headers)
            if raw.status >= 400:
                error = self._read(raw)
                raise GatewayError(raw.status, _error_message(error), error.content)
            yield _lines(raw, self.url)
        finally:
            conn.close()

    def _prepare(
        self, path: str, body: bytes, payload: Any, params: dict | None, headers: dict | None
    ) -> tuple[str, bytes, dict]:
        admin = path.startswith(("/system/", "/metrics"))
        headers = {**(self._headers if admin else self._call_headers), **(headers or {})}
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["content-type"] = "application/json"
        if params:
            path += "?" + urlencode(params)
        return path, body, headers

    def _send(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes, headers: dict
    ) -> http.client.HTTPResponse:
        try:
            conn.request(method, urlsplit(self.url).path + path, body=body, headers=headers)
            return conn.getresponse()
        except (UnicodeError, ValueError) as exc:  # a header http.client refuses to send
            raise GatewayError(0, f"invalid request: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise GatewayUnreachable(self.url, _reason(exc)) from None

    def _read(self, raw: http.client.HTTPResponse) -> Response:
        try:
            return Response(raw.status, raw.headers, raw.read())
        except (OSError, http.client.HTTPException) as exc:
            raise GatewayUnreachable(self.url, _reason(exc)) from None

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        try:
            target = urlsplit(self.url)
            port = target.port
        except ValueError:
            raise GatewayError(0, f"{self.url!r} is not a valid gateway address") from None
        if target.scheme not in ("http", "https") or not target.hostname:
            raise GatewayError(0, f"{self.url!r} is not a valid gateway address")
        https = target.scheme == "https"
        kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
        conn = kind(target.hostname, port, timeout=timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            reason = "ConnectTimeout" if isinstance(exc, TimeoutError) else "ConnectError"
            raise GatewayUnreachable(self.url, reason) from None
        return conn


def _system(name: str, rest: str = "") -> str:
    return f"/system/function/{quote(name, safe='')}{rest}"


def _lines(raw: http.client.HTTPResponse, url: str) -> Iterator[str]:
    try:
        for line in raw:
            yield line.decode(errors="replace").rstrip("\r\n")
    except (OSError, http.client.HTTPException) as exc:
        raise GatewayUnreachable(url, _reason(exc)) from None


def _chunks(raw: http.client.HTTPResponse, name: str) -> Iterator[bytes]:
    try:
        while chunk := raw.read1(1 << 16):
            yield chunk
    except http.client.IncompleteRead:
        raise GatewayError(
            0, f"the answer of {name} broke off before its end (see: dcf function log {name})"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise GatewayError(0, f"the answer of {name} broke off ({_reason(exc)})") from None


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive connection the gateway has closed: readable with nothing to read."""
    if conn.sock is None:
        return True
    try:
        return bool(select.select([conn.sock], [], [], 0)[0])
    except (ValueError, OSError):  # a descriptor select cannot watch: start afresh
        return True


def _reason(exc: BaseException) -> str:
    """httpx's names for what went wrong, as the CLI has always worded them."""
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "RemoteProtocolError"
    return "ReadError"
