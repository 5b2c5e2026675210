"""The ``dcf`` command answers at once: it loads no gateway, and ``call`` prints the answer
byte for byte into a pipe (with a newline added only on a terminal)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ECHO, GatewayProcess, deploy

# What `dcf function call` must not load: the gateway (FastAPI, Starlette, uvicorn) and the
# libraries that made every command take half a second (httpx, pydantic, yaml), each 0.05-0.1 s.
HEAVY = ("fastapi", "starlette", "uvicorn", "httpx", "pydantic", "yaml")
LOADED = """
import json, runpy, sys
sys.argv = ["dcf", *sys.argv[1:]]
try:
    runpy.run_module("dcf.cli.main", run_name="__main__")
except SystemExit:
    pass
sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)))
"""


def heavy(modules: list[str]) -> list[str]:
    return [
        m
        for m in modules
        if m.split(".")[0] in HEAVY or m.startswith(("dcf.gateway", "dcf.runtime", "dcf.config"))
    ]


def loaded_by(gw: GatewayProcess, *args: str, input: bytes = b"") -> tuple[bytes, list[str]]:
    """Run the CLI in a process that reports which modules it loaded."""
    result = subprocess.run(
        [sys.executable, "-c", LOADED, *args], input=input, capture_output=True, env=gw.env()
    )
    err, _, modules = result.stderr.rpartition(b"\nMODULES ")
    assert modules, err.decode()
    return result.stdout, json.loads(modules)


@pytest.fixture(scope="module")
def echo(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    deploy(gw, tmp_path_factory.mktemp("cli"), "cli-echo", ECHO)
    return "cli-echo"


def test_importing_the_cli_loads_no_gateway(tmp_path: Path):
    code = "import json, sys, dcf.cli.main; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert heavy(json.loads(out)) == []


def test_call_list_info_and_log_load_only_what_they_use(gw: GatewayProcess, echo: str):
    out, modules = loaded_by(gw, "function", "call", echo, input=b"fast")
    assert out == b"fast" and heavy(modules) == []
    for args in (["function", "list"], ["function", "info", echo], ["function", "log", echo]):
        out, modules = loaded_by(gw, *args)
        assert echo.encode() in out and heavy(modules) == [], args


def test_call_into_a_pipe_is_byte_exact(gw: GatewayProcess, echo: str):
    for body in (b"no newline", b"one newline\n", b"\x00\xff\xfe binary \r\n\r\n", b""):
        result = gw.dcf("function", "call", echo, input=body, check=True)
        assert result.stdout == body


def terminal_output(gw: GatewayProcess, *args: str, input: bytes) -> bytes:
    """What the CLI prints when its stdout is a terminal (a pseudo-terminal here)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcf.cli.main", *args],
        stdin=subprocess.PIPE,
        stdout=child,
        stderr=subprocess.PIPE,
        env=gw.env(),
    )
    os.close(child)
    proc.communicate(input, timeout=30)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    return out


def test_call_on_a_terminal_ends_the_answer_with_a_newline(gw: GatewayProcess, echo: str):
    # The terminal shows "\n" as "\r\n".
    assert terminal_output(gw, "function", "call", echo, input=b"abc") == b"abc\r\n"
    assert terminal_output(gw, "function", "call", echo, input=b"abc\n") == b"abc\r\n"


def test_bad_call_arguments_and_addresses_are_one_line_errors(gw: GatewayProcess, echo: str):
    cases = [
        (["function", "call", echo, "-H", "no colon"], "error: -H 'no colon': write a header"),
        (["function", "call", echo, "-H", "x-snow: \u2603"], "error: invalid request: "),
        (["function", "call", echo, "-H", "x-split: a\nb"], "error: invalid request: "),
        (["function", "call", echo, "-g", "http://host:port"], "is not a valid gateway address"),
        (["function", "list", "-g", "ftp://host"], "is not a valid gateway address"),
    ]
    for args, message in cases:
        result = gw.dcf(*args, input=b"x")
        err = result.stderr.decode().strip()
        assert result.returncode == 1 and message in err and len(err.splitlines()) == 1, err


def test_call_to_an_unreachable_gateway_is_one_line(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home")  # never started
    result = gw.dcf("function", "call", "anything", input=b"x")
    assert result.returncode == 1
    err = result.stderr.decode().strip()
    assert err == f"error: cannot reach the DCF gateway at http://{gw.address} (ConnectError)"
