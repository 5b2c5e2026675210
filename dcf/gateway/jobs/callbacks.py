"""``X-Callback-Url``: who the gateway may call with a job's answer, and the calling.

The allow-list is an SSRF guard. Without it anyone who may submit a job could
make the gateway POST to whatever it can reach — a cloud metadata service, an
admin API on the private network. By default only loopback is allowed. The
gateway itself is never allowed, whatever the list says: a job's answer is the
function's to write, and POSTed to the gateway's own API it could deploy or
delete functions. So any address of this machine (loopback, ``0.0.0.0``, its
bound host) on a port the gateway serves is refused, by address after
resolving, names included. An entry is a network (``10.0.0.0/8``, an
address) or a host name: a URL naming an allowed host is called as named; any
other host must resolve only to allowed
addresses, checked when the job is submitted and again before every attempt,
and the connection goes to the address that was checked (so a name cannot be
re-pointed between the check and the call). Redirects are never followed.

Delivery runs on a small thread pool with httpx, away from the event loop;
retries are timed by the loop, so a waiting retry holds no thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import httpx

DEFAULT_ALLOW = ("127.0.0.0/8", "::1", "localhost")
ATTEMPTS = 5
FIRST_RETRY = 0.5
"""Seconds before the second attempt; doubles for each one after."""
ATTEMPT_TIMEOUT = 10.0
THREADS = 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallbackRefused(ValueError):
    """A callback URL the allow-list (or URL syntax) does not permit; says which rule."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    trusted_name: bool
    """The host is allowed by name: no address check."""


class AllowList:
    def __init__(
        self, entries: Iterable[str] = DEFAULT_ALLOW, own_ports: Iterable[int] = ()
    ) -> None:
        self.entries = [e.strip() for e in entries if e.strip()]
        self.own_ports: set[int] = set(own_ports)
        """Ports the gateway serves on; this machine's addresses on them are refused."""
        self.networks: list[Network] = []
        self.hosts: set[str] = set()
        for entry in self.entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _is_hostname(entry):
                    raise ValueError(
                        f"--callback-allow: {entry!r} is neither a network (CIDR or address)"
                        " nor a host name"
                    ) from None
                self.hosts.add(entry.lower().rstrip("."))

    def describe(self) -> str:
        return ", ".join(self.entries) or "nothing"

    def target(self, url: str) -> Target:
        """Parse and check what can be checked without resolving names."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise CallbackRefused(f"X-Callback-Url {url!r} is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CallbackRefused(
                f"X-Callback-Url {url!r} must be an absolute http:// or https:// URL"
            )
        host = parts.hostname.lower().rstrip(".")
        port = port or (443 if parts.scheme == "https" else 80)
        target = Target(url, parts.scheme, host, port, host in self.hosts)
        if _address(host) is not None:
            self.check_addresses(target, [host])
        return target

    def check_addresses(self, target: Target, addresses: list[str]) -> None:
        for address in addresses:
            ip = _address(address)
            if ip is not None and target.port in self.own_ports and _is_local(ip):
                via = "" if address == target.host else f" (it resolves to {address})"
                raise CallbackRefused(
                    f"X-Callback-Url {target.url!r} is refused: {target.host}:{target.port}{via}"
                    " is the gateway's own address and port, and a callback never calls the"
                    " gateway itself, whatever --callback-allow says"
                )
            if target.trusted_name:
                continue
            if ip is None or not any(ip in net for net in self.networks):
                via = "" if address == target.host else f" (it resolves to {address})"
                raise CallbackRefused(
                    f"X-Callback-Url {target.url!r} is not allowed: {target.host}{via} is not"
                    f" in the gateway's callback allow-list ({self.describe()}); the gateway's"
                    " operator can allow it with dcf gateway start --callback-allow"
                )

    async def vet(self, url: str) -> None:
        """At submit time: refuse a URL the gateway would not call (CallbackRefused)."""
        target = self.target(url)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise CallbackRefused(
                f"X-Callback-Url {url!r}: cannot resolve {target.host!r} ({exc})"
            ) from None
        self.check_addresses(target, [info[4][0] for info in infos])

    def resolve(self, target: Target) -> tuple[str, dict[str, Any], dict[str, str]]:
        """Blocking: the URL to connect to, httpx extensions and extra headers."""
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        self.check_addresses(target, addresses)
        ip = addresses[0]
        parts = urlsplit(target.url)
        netloc = f"[{ip}]" if ":" in ip else ip
        pinned = urlunsplit((parts.scheme, f"{netloc}:{target.port}", parts.path, parts.query, ""))
        default_port = 443 if target.scheme == "https" else 80
        host = target.host if target.port == default_port else f"{target.host}:{target.port}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        return pinned, extensions, {"host": host}


class Deliverer:
    """POSTs answers to callback URLs from its own threads, with bounded retries."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="dcf-callback")
        self._client: httpx.Client | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    async def deliver(
        self, url: str, headers: dict[str, str], body: Any, on_attempt_error: Any = None
    ) -> str | None:
        """Try up to ATTEMPTS times; None when delivered, else the last error.

        ``body`` is bytes or a callable opening a fresh binary file per attempt.
        """
        loop = asyncio.get_running_loop()
        delay = FIRST_RETRY
        error = None
        for attempt in range(1, ATTEMPTS + 1):
            error = await loop.run_in_executor(self._pool, self._post, url, headers, body)
            if error is None:
                return None
            if on_attempt_error is not None:
                on_attempt_error(attempt, error)
            if attempt < ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        return error

    def _post(self, url: str, headers: dict[str, str], body: Any) -> str | None:
        import httpx  # only gateways that call back pay for the import

        if self._client is None:
            # trust_env=False: no proxy from the environment stands between the check and the call.
            self._client = httpx.Client(
                trust_env=False, follow_redirects=False, timeout=ATTEMPT_TIMEOUT
            )
        file: IO[bytes] | None = None
        try:
            target = self.allow.target(url)
            pinned, extensions, extra = self.allow.resolve(target)
            content = body
            if callable(body):
                file = content = body()
            response = self._client.post(
                pinned, content=content, headers={**headers, **extra}, extensions=extensions
            )
            if 200 <= response.status_code < 300:
                return None
            return f"{url} answered {response.status_code}"
        except CallbackRefused as exc:
            return str(exc)
        except (httpx.HTTPError, OSError) as exc:
            return f"{url}: {type(exc).__name__}: {exc}"
        finally:
            if file is not None:
                file.close()


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """One of this machine's addresses: loopback, unspecified, or one it can bind."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))  # the kernel binds only addresses of its own interfaces
    except OSError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )
