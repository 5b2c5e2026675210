"""config.yaml's ``build:`` through a real gateway: streaming, caching, results, failure,
timeout, deletion mid-build and a gateway restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ECHO, GatewayProcess, alive, deploy, processes_with, write_function

READ_BUILT = """
from pathlib import Path

def Handler(req):
    return (Path(__file__).parent / "built.txt").read_text()
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def wait_dead(pids: list[int], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def wait_for_pids(marker: str, count: int, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := processes_with(marker)) < count:
        assert time.monotonic() < deadline, "the build step never started"
        time.sleep(0.05)
    return pids


RAN = "echo ran-$((40 + 2))"
"""A step that says it ran: its output ``ran-42`` is in the log, its command line is not."""


def runs(gw: GatewayProcess, name: str) -> int:
    """How many times a build step of ``name`` ran, counted in its log (a sandboxed step
    cannot write the host's files)."""
    log = gw.dcf("function", "log", name, check=True).stdout.decode()
    return sum(line.endswith(" ran-42") for line in log.splitlines())


def create(gw: GatewayProcess, config: Path, name: str, *flags: str):  # noqa: ANN201
    return gw.dcf("function", "create", "-f", str(config), name, *flags)


def call(gw: GatewayProcess, name: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/function/{name}", content=b"x", timeout=30)


def builds(gw: GatewayProcess) -> list[str]:
    """What the build cache holds: finished builds, and any leftover temporary dir."""
    directory = gw.home / "builds"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_build_streams_runs_once_and_its_results_reach_the_replica(gw: GatewayProcess, root):
    config = write_function(
        root,
        "built",
        READ_BUILT,
        requirements="pyyaml\n",  # installed already: an environment of its own, quickly
        environment={"GREETING": "hi"},
        build=[
            RAN,
            'echo "made with $GREETING" > built.txt; echo "step output: $GREETING"',
            "python -c 'import sys; print(\"python\", sys.executable)'; echo venv=$VIRTUAL_ENV",
        ],
    )
    created = create(gw, config, "built", "-v")
    assert created.returncode == 0, created.stderr.decode()
    out = created.stdout.decode()
    assert "  [built] build step 2/3: " in out
    assert "  [built] step output: hi" in out  # the command's own output, line by line
    python_line = next(line for line in out.splitlines() if "[built] python " in line)
    venv = next(line for line in out.splitlines() if "[built] venv=" in line).split("=", 1)[1]
    assert venv.startswith(str(gw.home / "envs"))  # the requirements' environment
    assert python_line.split()[-1].startswith(venv)  # and its python first on PATH
    assert call(gw, "built").text == "made with hi\n"
    assert runs(gw, "built") == 1
    assert "step output: hi" in gw.dcf("function", "log", "built", check=True).stdout.decode()
    assert not (root / "built" / "built.txt").exists()  # a copy was built, not the upload

    again = create(gw, config, "built", "-v", "--update")
    assert again.returncode == 0, again.stderr.decode()
    assert "cached, nothing to run" in again.stdout.decode()
    assert "step output" not in again.stdout.decode()
    assert runs(gw, "built") == 1  # nothing ran
    assert gw.wait_status("built", "Ready")["version"] == 2
    assert call(gw, "built").text == "made with hi\n"

    data = yaml.safe_load(config.read_text())
    data["functions"]["built"]["environment"]["GREETING"] = "hello"  # an input changed
    config.write_text(yaml.safe_dump(data))
    create(gw, config, "built", "--update").check_returncode()
    assert runs(gw, "built") == 2
    assert call(gw, "built").text == "made with hello\n"
    assert not [b for b in builds(gw) if b.startswith(".")]


def test_failing_build_fails_the_deploy_and_an_update_keeps_the_old_version(
    gw: GatewayProcess, root: Path
):
    failing = "for i in $(seq 1 30); do echo line-$i; done; echo oops >&2; exit 3"
    config = write_function(root, "broken", ECHO, build=[failing])
    first = create(gw, config, "broken")
    assert first.returncode == 1
    err = first.stderr.decode()
    assert "broken: Failed" in err and "failed with exit status 3" in err
    assert "line-30\noops" in err and "line-12\n" in err and "line-11\n" not in err  # last 20
    assert "Traceback" not in err
    assert gw.wait_status("broken", "Failed")["failure"].count("exit status 3") == 1

    deploy(gw, root, "kept", ECHO)
    before = builds(gw)
    config = write_function(root, "kept", ECHO, build=["echo fine", failing])
    update = create(gw, config, "kept", "--update", "-v")
    assert update.returncode == 1
    assert "  [kept] fine" in update.stdout.decode()
    err = update.stderr.decode()
    assert "still serving version 1" in err and "exit status 3" in err and "oops" in err
    info = gw.wait_status("kept", "Ready")
    assert info["version"] == 1 and "exit status 3" in info["last_error"]
    assert call(gw, "kept").content == b"x"
    assert builds(gw) == before  # a failed build leaves nothing behind


def test_build_timeout_kills_the_command_and_names_the_timeout(gw: GatewayProcess, root: Path):
    step = "echo sleeping; python -c 'import time; time.sleep(30.25)'"
    config = write_function(root, "slow-build", ECHO, build=[step], build_timeout="1s")
    started = time.monotonic()
    result = create(gw, config, "slow-build")
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "did not finish within build_timeout (1s)" in err and "time.sleep(30.25)" in err
    assert "sleeping" in err  # it had started
    wait_dead(processes_with("time.sleep(30.25)"))


def test_deleting_a_function_mid_build_kills_its_commands(gw: GatewayProcess, root: Path):
    step = "sleep 60.75 & wait"
    config = write_function(root, "doomed", ECHO, build=[step])
    create(gw, config, "doomed", "--no-wait").check_returncode()
    pids = wait_for_pids("60.75", 2)  # the shell and its child (and a sandbox's bwrap)
    assert all(alive(p) for p in pids)
    gw.dcf("function", "delete", "doomed", check=True)
    wait_dead(pids)
    assert not [b for b in builds(gw) if b.startswith(".")]


def test_a_built_function_survives_a_gateway_restart(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home").start()
    try:
        config = write_function(
            tmp_path, "durable", READ_BUILT, build=[f"{RAN}; echo v1 > built.txt"]
        )
        create(gw, config, "durable").check_returncode()
        gw.stop()
        gw.start()
        assert gw.wait_status("durable", "Ready", timeout=30)
        assert call(gw, "durable").text == "v1\n"
        assert runs(gw, "durable") == 1  # restored from the cache, not rebuilt
    finally:
        gw.stop()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"build": 5}, "field 'build': must be a list of shell commands"),
        ({"build": ["ok", ""]}, "field 'build': must be a list of shell commands"),
        ({"build_timeout": "soon"}, "field 'build_timeout': 'soon' is not a duration"),
    ],
)
def test_bad_build_settings_are_one_line_errors(gw: GatewayProcess, root, settings, message):
    config = write_function(root, "bad-build", ECHO, **settings)
    result = create(gw, config, "bad-build")
    assert result.returncode == 1
    err = result.stderr.decode().strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
