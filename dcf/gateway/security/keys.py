"""Function keys, and which credentials a handler may see: checked once, at the data plane's door.

A function with ``auth: key`` answers only callers that present one of its
keys, as ``X-DCF-Key: KEY`` or ``Authorization: Bearer KEY``. The gateway makes
each key from 32 random bytes, shows it once, and keeps only its SHA-256:
a key is high-entropy, so a plain hash is as good as a slow one, and the check
on the hot path is one hash and one dict lookup. (The lookup compares digests
of the caller's own guess, so its timing reveals nothing about a stored key.)
The admin token is never a key: keys are only ever made here.

Whatever a function asks, ``X-DCF-Key`` never reaches its handler, and neither
does ``Authorization`` unless the function sets ``forward_authorization``.
Every invocation path (sync and async) goes through ``Guard.admit`` before
anything else reads the request, so no path can skip it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcf.config import FunctionSpec
    from dcf.gateway.lifecycle.registry import Registry

_PREFIXES = ("/function/", "/async-function/")
KEY_HEADER = b"x-dcf-key"
_CREDENTIALS = frozenset({b"authorization", KEY_HEADER})
_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
MAX_RATE = 1_000_000.0
MAX_KEYS = 1000  # active keys per function

Refusal = tuple[int, dict, list[tuple[bytes, bytes]]]
"""status, JSON payload, extra headers: what the data plane answers instead of calling."""


class TooManyKeys(Exception):
    """A function has MAX_KEYS active keys already."""


def parse_rate(text: str) -> tuple[float, float]:
    """``"5/s"``, ``"100/m"``, ``"1000/h"`` or ``"5"`` (per second) → (calls, per seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([a-z]+))?\s*", str(text).lower())
    if not match or (match.group(2) or "s") not in _UNITS:
        raise ValueError(
            f"rate {text!r} is not a rate: write calls per time, e.g. 5/s, 100/m, 1000/h"
        )
    count, per = float(match.group(1)), _UNITS[match.group(2) or "s"]
    if count <= 0 or count / per > MAX_RATE:
        raise ValueError(f"rate {text!r} must be more than 0 and at most {MAX_RATE:g}/s")
    return count, per


def digest_of(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@dataclass
class Key:
    """One function key: its public id, the hash of its secret, its rate limit (a token bucket)."""

    id: str
    function: str
    digest: bytes
    rate: str | None
    created_at: float
    revoked_at: float | None = None
    capacity: float = 0.0
    refill: float = 0.0  # tokens per second; 0: no limit
    tokens: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        if self.rate:
            count, per = parse_rate(self.rate)
            self.capacity = max(count, 1.0)
            self.refill = count / per
            self.tokens = self.capacity
            self.stamp = time.monotonic()

    def wait(self) -> float:
        """Take one call from the bucket: 0 if allowed, else seconds until one is."""
        if not self.refill:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.refill

    def public(self) -> dict:
        """What the API shows of a key: never the key, never its hash."""
        return {
            "id": self.id,
            "function": self.function,
            "rate": self.rate,
            "created_at": self.created_at,
            "revoked": self.revoked_at is not None,
            "revoked_at": self.revoked_at,
        }


class Policy:
    """A function's door: whether it needs a key, whether its handler sees Authorization."""

    __slots__ = ("forward", "keyed", "keys", "name")

    def __init__(self, name: str, keyed: bool, forward: bool, keys: dict[bytes, Key]) -> None:
        self.name = name
        self.keyed = keyed
        self.forward = forward
        self.keys = keys


class Guard:
    """Function keys (made, listed, revoked, persisted) and the check every invocation passes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._policies: dict[str, Policy] = {}  # only functions that need a key or forward
        self._keys: dict[str, dict[bytes, Key]] = {}
        for row in registry.function_keys():
            key = Key(
                id=row["id"],
                function=row["function"],
                digest=bytes.fromhex(row["digest"]),
                rate=row["rate"],
                created_at=row["created_at"],
                revoked_at=row["revoked_at"],
            )
            self._keys.setdefault(key.function, {})[key.digest] = key

    # the hot path ----------------------------------------------------------------

    def admit(self, scope: dict) -> Refusal | None:
        """None to let the call through (its credentials taken out of ``scope``), else why not.

        The usual call sends no credentials and its function needs none: one pass over
        the header names, then one dict lookup (none while no function has a policy).
        """
        headers = scope["headers"]
        policies = self._policies
        for name, _ in headers:
            if name in _CREDENTIALS:
                break
        else:  # nothing to take out
            if not policies:
                return None
            policy = policies.get(_function(scope))
            return self._check(policy, None) if policy is not None and policy.keyed else None
        policy = policies.get(_function(scope)) if policies else None
        if policy is None:
            scope["headers"] = [h for h in headers if h[0] not in _CREDENTIALS]
            return None
        presented = authorization = None
        kept = []
        for header in headers:
            name = header[0]
            if name == KEY_HEADER:
                presented = header[1]
            elif name == b"authorization":
                authorization = header[1]
                if policy.forward:
                    kept.append(header)
            else:
                kept.append(header)
        scope["headers"] = kept
        if not policy.keyed:
            return None
        if presented is None and authorization is not None:
            scheme, _, value = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                presented = value
        return self._check(policy, presented.strip() if presented else None)

    def _check(self, policy: Policy, presented: bytes | None) -> Refusal | None:
        name = policy.name
        if not presented:
            return _unauthorized(
                name,
                f"function {name!r} needs a key: send it as 'X-DCF-Key: KEY' or"
                " 'Authorization: Bearer KEY' (dcf function call --key KEY)",
            )
        digest = digest_of(presented)
        key = policy.keys.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return _unauthorized(
                name, f"function {name!r} needs a key: this is not one of its keys"
            )
        if key.revoked_at is not None:
            return _unauthorized(name, f"key {key.id} of function {name!r} was revoked")
        wait = key.wait()
        if wait:
            retry = str(max(1, math.ceil(wait))).encode()
            message = f"key {key.id} of function {name!r} is over its rate limit of {key.rate}"
            return 429, {"error": message, "function": name}, [(b"retry-after", retry)]
        return None

    # the control plane -----------------------------------------------------------

    def set_policy(self, name: str, spec: FunctionSpec | None) -> None:
        """Apply the version of ``name`` that now serves (None: the function is gone)."""
        if spec is None:
            self._policies.pop(name, None)
            self._keys.pop(name, None)
            return
        if spec.auth == "key" or spec.forward_authorization:
            keys = self._keys.setdefault(name, {})
            self._policies[name] = Policy(
                name, spec.auth == "key", spec.forward_authorization, keys
            )
        else:
            self._policies.pop(name, None)

    def requires_key(self, name: str) -> bool:
        policy = self._policies.get(name)
        return policy is not None and policy.keyed

    def create(self, name: str, rate: str | None) -> tuple[Key, str]:
        """A new key for ``name``: (its record, the key itself, shown this once)."""
        if rate is not None:
            parse_rate(rate)  # a ValueError names what is wrong
        active = sum(k.revoked_at is None for k in self._keys.get(name, {}).values())
        if active >= MAX_KEYS:
            raise TooManyKeys(
                f"function {name!r} has {active} active keys, the most it may have: revoke some"
            )
        taken = {k.id for keys in self._keys.values() for k in keys.values()}
        key_id = "k_" + secrets.token_hex(6)
        while key_id in taken:
            key_id = "k_" + secrets.token_hex(6)
        secret = f"dcf_{key_id[2:]}_{secrets.token_urlsafe(32)}"
        keys = self._keys.setdefault(name, {})
        key = Key(key_id, name, digest_of(secret.encode()), rate, time.time())
        self.registry.add_key(key.id, name, key.digest.hex(), rate, key.created_at)
        keys[key.digest] = key
        return key, secret

    def list(self, name: str) -> list[Key]:
        return sorted(self._keys.get(name, {}).values(), key=lambda k: k.created_at)

    def revoke(self, name: str, key_id: str) -> Key | None:
        for key in self._keys.get(name, {}).values():
            if key.id == key_id:
                if key.revoked_at is None:
                    key.revoked_at = time.time()
                    self.registry.revoke_key(key.id, key.revoked_at)
                return key
        return None


def _function(scope: dict) -> str:
    """The function a data-plane path calls ('' for a job's result: its id is the capability)."""
    path: str = scope["path"]
    if path.startswith(_PREFIXES[0]):
        return path[len(_PREFIXES[0]) :].partition("/")[0]
    rest = path[len(_PREFIXES[1]) :]
    if rest.startswith("jobs/") and scope["method"] in ("GET", "HEAD"):
        return ""
    return rest.partition("/")[0]


def _unauthorized(name: str, message: str) -> Refusal:
    challenge = f'Bearer realm="function {name}"'.encode()
    return 401, {"error": message, "function": name}, [(b"www-authenticate", challenge)]
