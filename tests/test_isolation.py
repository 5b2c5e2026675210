"""Attacks from inside a function on the others and on the host, through a real gateway.

Each test is what a hostile tenant would do from a handler; it passes when
the attack fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ECHO, GatewayProcess, deploy

FORGE = """
import socket, struct

def Handler(req):
    # One wire frame with forged headers, straight to another replica's socket.
    meta = "POST\\n/\\n\\nx-dcf-key:forged".encode()
    body = b"hi"
    frame = struct.pack("!III", 7, len(meta), len(body)) + meta + body
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(req.input.decode())
        s.sendall(frame)
        got = s.recv(4096)
    except OSError as exc:
        return {"answer": None, "error": type(exc).__name__}
    return {"answer": got.hex() or None, "error": None}
"""


def _info(gw: GatewayProcess, name: str) -> dict:
    with gw.http() as http:
        return http.get(f"/system/function/{name}").json()


def _call(gw: GatewayProcess, name: str, body: bytes = b"") -> tuple[int, dict]:
    with gw.http() as http:
        r = http.post(f"/function/{name}", content=body, timeout=60)
    try:
        return r.status_code, r.json()
    except json.JSONDecodeError:
        return r.status_code, {"text": r.text}


@pytest.fixture(scope="module")
def process_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("iso-process") / "home").start()
    yield gateway
    gateway.stop()


def test_another_replicas_socket_answers_no_forged_frame(
    process_gw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(process_gw, tmp_path, "victim", ECHO)
    deploy(process_gw, tmp_path, "forger", FORGE)
    victim = _info(process_gw, "victim")["replicas"]["list"][0]["address"]
    status, out = _call(process_gw, "forger", victim.encode())
    assert status == 200, out
    assert out["answer"] is None, f"the victim's replica answered a forged frame: {out}"
    assert Path(victim).stat().st_mode & 0o777 == 0o600
    assert Path(victim).parent.stat().st_mode & 0o777 == 0o700
    # The gateway itself still gets through.
    assert _call(process_gw, "victim", b'"ok"') == (200, "ok")
