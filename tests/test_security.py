"""Issue 9's attacks on secrets and limits, re-run against a real gateway.

What a function can see (defect 3), what reaches the management API before
the token is checked (defect 4), what the API and the disk reveal (defect 11),
and function keys (build 2). Each attack is made as a hostile caller or
handler would make it: over real HTTP, through the real CLI, from real
replicas.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ECHO, GatewayProcess, deploy

TOKEN = "adm1n-t0ken-that-no-handler-may-see"
MARKER = "GATEWAY_ONLY_MARKER_9"  # set in the gateway's environment only
MiB = 1 << 20

SNOOP = """
import os

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError as exc:
        return f"unreadable: {exc}"

def Handler(req):
    ppid = os.getppid()
    return {
        "env": dict(os.environ),
        "headers": req.headers,
        "ppid": ppid,
        "parent_environ": _read(f"/proc/{ppid}/environ"),
        "parent_cmdline": _read(f"/proc/{ppid}/cmdline"),
        "build_env": _read("build_env.txt"),
        "build_parent_environ": _read("build_parent_environ.txt"),
    }
"""


class MarkedGateway(GatewayProcess):
    """A token-protected gateway whose environment holds a variable only it should have."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env[MARKER] = "gateway-only-value"
        return env


@pytest.fixture(scope="module")
def sgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = MarkedGateway(tmp_path_factory.mktemp("security") / "home", token=TOKEN).start()
    yield gateway
    gateway.stop()


def _rss(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _healthz_fast(gw: GatewayProcess) -> None:
    started = time.monotonic()
    assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 1


# defect 3: the admin token and the gateway's environment reach function code ------------


def test_handler_sees_no_token_no_gateway_env_no_authorization(sgw: GatewayProcess, tmp_path):
    deploy(
        sgw,
        tmp_path,
        "snoop",
        SNOOP,
        environment={"FROM_CONFIG": "yes"},
        build=["env > build_env.txt; cat /proc/$PPID/environ > build_parent_environ.txt || true"],
    )
    # Through the CLI, which holds the admin token in $DCF_TOKEN.
    called = sgw.dcf("function", "call", "snoop", input=b"x", check=True)
    assert TOKEN.encode() not in called.stdout
    seen = json.loads(called.stdout)
    assert "authorization" not in seen["headers"]
    env = seen["env"]
    assert env["FROM_CONFIG"] == "yes"  # the function's own environment
    assert "PATH" in env and "HOME" in env  # and what the runtime needs
    for private in (MARKER, "DCF_TOKEN", "DCF_PARENT_PID", "DCF_HOME", "DCF_GATEWAY"):
        assert private not in env, private
    # The gateway's own process is no way round: its environ and argv hold no token.
    assert TOKEN not in seen["parent_environ"]
    assert TOKEN not in seen["parent_cmdline"]
    # Nor do build steps, or what they can read of the gateway.
    assert "FROM_CONFIG=yes" in seen["build_env"]
    assert MARKER not in seen["build_env"]
    assert TOKEN not in seen["build_env"] + seen["build_parent_environ"]

    # curl-style: a caller's Authorization header is not handed to the handler.
    for header in ({"authorization": f"Bearer {TOKEN}"}, {"authorization": "Basic dXNlcjpwdw=="}):
        r = httpx.post(sgw.url + "/function/snoop", content=b"x", headers=header)
        assert r.status_code == 200
        assert TOKEN not in r.text
        assert "authorization" not in r.json()["headers"]


def test_authorization_reaches_a_handler_that_opts_in(sgw: GatewayProcess, tmp_path):
    deploy(sgw, tmp_path, "opted-in", SNOOP, forward_authorization=True)
    r = httpx.post(
        sgw.url + "/function/opted-in", content=b"x", headers={"authorization": "Bearer user-jwt"}
    )
    assert r.json()["headers"]["authorization"] == "Bearer user-jwt"
    assert TOKEN not in r.text  # still none of the gateway's own


# defect 4: the management API reads any body before it checks the token -------------------


def _answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_unauthenticated_huge_post_is_refused_before_its_body_is_read(sgw: GatewayProcess):
    before = _rss(sgw)
    size = 200 * MiB
    with socket.create_connection(("127.0.0.1", sgw.port)) as sock:
        sock.sendall(
            b"POST /system/functions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        started = time.monotonic()
        head = _answer(sock)  # before a byte of the body was sent
        assert head.startswith(b"HTTP/1.1 401"), head[:200]
        assert time.monotonic() - started < 1
        chunk = b"{" * MiB
        sent = 0
        try:  # the attacker streams anyway
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    _healthz_fast(sgw)
    assert _rss(sgw) - before < 30 * MiB


def test_authenticated_body_over_the_limit_is_413_before_and_while_reading(sgw: GatewayProcess):
    before = _rss(sgw)
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    with socket.create_connection(("127.0.0.1", sgw.port)) as sock:
        sock.sendall(
            b"POST /system/functions HTTP/1.1\r\nHost: gw\r\n" + auth
            + b"Content-Length: %d\r\n\r\n" % (200 * MiB)
        )
        head = _answer(sock)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
    # No Content-Length: counted while it streams, refused at the first byte over
    # (1 MiB on every route but a deploy's, which carries the code).
    with socket.create_connection(("127.0.0.1", sgw.port)) as sock:
        sock.sendall(
            b"POST /system/function/snoop/keys HTTP/1.1\r\nHost: gw\r\n" + auth
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n" % (64 << 10) + b"[" * (64 << 10) + b"\r\n"
        for _ in range(16):  # exactly the 1 MiB limit: still accepted so far
            sock.sendall(chunk)
        sock.sendall(b"1\r\n[\r\n")  # one byte over
        head = _answer(sock, timeout=10)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert b"limit" in head + sock.recv(65536)
    _healthz_fast(sgw)
    assert _rss(sgw) - before < 30 * MiB


# defect 11: secrets in plaintext, /metrics open --------------------------------------------


def test_environment_values_are_redacted_and_state_is_private(sgw: GatewayProcess, tmp_path):
    deploy(sgw, tmp_path, "secretive", ECHO, environment={"API_SECRET": "hunter2-value"})
    with sgw.http() as http:
        info = http.get("/system/function/secretive").json()
    assert info["spec"]["environment"] == {"API_SECRET": "***"}
    assert "hunter2-value" not in json.dumps(info)
    shown = sgw.dcf("function", "info", "secretive", check=True).stdout.decode()
    assert "API_SECRET" in shown and "hunter2-value" not in shown

    home = sgw.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("dcf.db", "dcf.db-wal", "dcf.db-shm"):
        if (home / name).exists():
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name


def test_metrics_needs_the_token(sgw: GatewayProcess):
    assert httpx.get(sgw.url + "/metrics").status_code == 401
    r = httpx.get(sgw.url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "dcf_" in r.text
    assert httpx.get(sgw.url + "/healthz").status_code == 200  # liveness stays open


# build 2: function keys --------------------------------------------------------------------


def _key_of(created: bytes) -> tuple[str, str]:
    """(key id, key) from `dcf function keys NAME create`'s output."""
    lines = created.decode().splitlines()
    key = next(line.split()[-1] for line in lines if line.startswith("Key:"))
    key_id = next(line.split()[-1] for line in lines if line.startswith("Id:"))
    return key_id, key


def test_function_keys_create_call_list_revoke(sgw: GatewayProcess, tmp_path):
    deploy(sgw, tmp_path, "keyed", SNOOP, auth="key")
    deploy(sgw, tmp_path, "other-keyed", ECHO, auth="key")
    url = sgw.url + "/function/keyed"

    r = httpx.post(url, content=b"x")
    assert r.status_code == 401
    assert r.json()["function"] == "keyed" and "key" in r.json()["error"]
    refused = sgw.dcf("function", "call", "keyed", input=b"x")
    assert refused.returncode == 1 and len(refused.stderr.decode().splitlines()) == 1
    assert b"key" in refused.stderr
    # The admin token is not a key, whichever way it is sent.
    for header in ({"x-dcf-key": TOKEN}, {"authorization": f"Bearer {TOKEN}"}):
        assert httpx.post(url, content=b"x", headers=header).status_code == 401
    # Async calls are checked at the same door.
    assert httpx.post(sgw.url + "/async-function/keyed", content=b"x").status_code == 401

    created = sgw.dcf("function", "keys", "keyed", "create", check=True).stdout
    key_id, key = _key_of(created)
    other = sgw.dcf("function", "keys", "other-keyed", "create", check=True).stdout
    other_id, other = _key_of(other)

    r = httpx.post(url, content=b"x", headers={"x-dcf-key": key})
    assert r.status_code == 200
    assert key not in r.text and "x-dcf-key" not in r.json()["headers"]
    r = httpx.post(url, content=b"x", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200 and "authorization" not in r.json()["headers"]
    called = sgw.dcf("function", "call", "keyed", "--key", key, input=b"x", check=True)
    assert key.encode() not in called.stdout
    # A key of another function opens nothing here.
    assert httpx.post(url, content=b"x", headers={"x-dcf-key": other}).status_code == 401
    assert httpx.post(url, content=b"x", headers={"x-dcf-key": key + "x"}).status_code == 401

    listed = sgw.dcf("function", "keys", "keyed", "list", check=True).stdout.decode()
    assert key_id in listed and key not in listed
    with sgw.http() as http:
        rows = http.get("/system/function/keyed/keys").json()
    assert [row["id"] for row in rows] == [key_id]
    assert key not in json.dumps(rows)

    sgw.dcf("function", "keys", "keyed", "revoke", key_id, check=True)
    r = httpx.post(url, content=b"x", headers={"x-dcf-key": key})
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert other_id  # the other function's key is untouched
    assert httpx.post(sgw.url + "/function/other-keyed", content=b"o",
                      headers={"x-dcf-key": other}).content == b"o"


def test_function_key_rate_limit_is_429_with_retry_after(sgw: GatewayProcess, tmp_path):
    deploy(sgw, tmp_path, "limited", ECHO, auth="key")
    created = sgw.dcf("function", "keys", "limited", "create", "--rate", "2/s", check=True)
    _, key = _key_of(created.stdout)
    codes = []
    with httpx.Client(base_url=sgw.url, headers={"x-dcf-key": key}) as http:
        for _ in range(4):
            r = http.post("/function/limited", content=b"x")
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert "rate" in r.json()["error"]
        assert codes[:2] == [200, 200] and 429 in codes
        time.sleep(1.1)
        assert http.post("/function/limited", content=b"x").status_code == 200


def test_function_key_bad_input_is_one_line(sgw: GatewayProcess, tmp_path):
    deploy(sgw, tmp_path, "keyless", ECHO)
    for args, words in (
        (("keys", "keyless", "create", "--rate", "fast"), "rate"),
        (("keys", "keyless", "create", "--rate", "0/s"), "rate"),
        (("keys", "nobody", "list"), "no function"),
        (("keys", "keyless", "revoke", "k_nothing"), "no key"),
    ):
        result = sgw.dcf("function", *args)
        assert result.returncode == 1, args
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, lines)
    # A key for a function that does not ask for one says so, and the function stays open.
    created = sgw.dcf("function", "keys", "keyless", "create", check=True)
    assert b"auth: key" in created.stdout + created.stderr
    assert httpx.post(sgw.url + "/function/keyless", content=b"o").content == b"o"
    # Until an update turns auth on: from the switch on, only its keys open it.
    deploy(sgw, tmp_path, "keyless", ECHO, update=True, auth="key")
    _, key = _key_of(created.stdout)
    assert httpx.post(sgw.url + "/function/keyless", content=b"o").status_code == 401
    r = httpx.post(sgw.url + "/function/keyless", content=b"o", headers={"x-dcf-key": key})
    assert r.content == b"o"
    r = httpx.post(sgw.url + "/system/function/keyless/keys", json={"rate": "fast"},
                   headers=sgw.headers())
    assert r.status_code == 400 and "rate" in r.json()["error"]
    assert httpx.post(sgw.url + "/system/function/keyless/keys", json={}).status_code == 401


def test_function_keys_survive_a_restart(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home", token=TOKEN).start()
    try:
        deploy(gw, tmp_path, "durable-keyed", ECHO, auth="key")
        _, kept = _key_of(gw.dcf("function", "keys", "durable-keyed", "create", check=True).stdout)
        gone_id, gone = _key_of(
            gw.dcf("function", "keys", "durable-keyed", "create", check=True).stdout
        )
        gw.dcf("function", "keys", "durable-keyed", "revoke", gone_id, check=True)
        gw.stop()
        gw.start()
        gw.wait_status("durable-keyed", "Ready", timeout=30)
        url = gw.url + "/function/durable-keyed"
        assert httpx.post(url, content=b"k", headers={"x-dcf-key": kept}).content == b"k"
        assert httpx.post(url, content=b"k", headers={"x-dcf-key": gone}).status_code == 401
        assert httpx.post(url, content=b"k").status_code == 401
        assert gone not in (gw.home / "dcf.db").read_bytes().decode("latin-1")
        assert kept not in (gw.home / "dcf.db").read_bytes().decode("latin-1")
        # A function deleted and created again under its name starts with no keys.
        gw.dcf("function", "delete", "durable-keyed", check=True)
        deploy(gw, tmp_path, "durable-keyed", ECHO, auth="key")
        assert httpx.post(url, content=b"k", headers={"x-dcf-key": kept}).status_code == 401
        assert gw.dcf("function", "keys", "durable-keyed", "list", check=True).stdout.count(
            b"\n"
        ) == 1  # the header line only
    finally:
        gw.stop()


def test_gateway_started_from_env_token_hides_it_too(tmp_path: Path):
    """``DCF_TOKEN=... dcf gateway start``: the variable is gone from the gateway's environ."""
    gw = GatewayProcess(tmp_path / "home")
    gw.token = TOKEN  # for the CLI and headers; the gateway reads it from its environment
    env = gw.env()
    env["DCF_TOKEN"] = TOKEN
    cmd = [sys.executable, "-m", "dcf.cli.main", "gateway", "start", "--port", str(gw.port)]
    with open(gw.log_path, "ab") as log:
        gw.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(gw.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        environ = Path(f"/proc/{gw.proc.pid}/environ").read_bytes()
        assert TOKEN.encode() not in environ
        assert TOKEN.encode() not in Path(f"/proc/{gw.proc.pid}/cmdline").read_bytes()
        assert httpx.get(gw.url + "/system/functions").status_code == 401
        r = httpx.get(gw.url + "/system/functions", headers=gw.headers())
        assert r.status_code == 200
    finally:
        gw.stop()
    assert os.environ.get("DCF_TOKEN") != TOKEN
