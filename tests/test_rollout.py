"""Kept versions, rollback and canary rollouts, end to end: real gateways (local and Ray),
real replicas, real HTTP and the CLI, under a steady calling loop.

Intervals are short (2 s) and ``min_calls`` small so the whole file stays fast; the
judge and the routing are the same as with the defaults.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayProcess, write_function

VERSIONED = """
import time
VERSION = "{v}"
def Handler(req):
    time.sleep({sleep})
    return VERSION
"""
FAILING = """
import itertools
calls = itertools.count()
def Handler(req):
    if next(calls) % 10 < 3:
        raise RuntimeError("v2 is broken for 30% of calls")
    return "v2"
"""
BUILT = """
from pathlib import Path
VERSION = "{v}"
def Handler(req):
    return VERSION + ":" + Path(__file__).with_name("built.txt").read_text().strip()
"""
FAST = {"steps": [10, 50, 100], "interval": "2s", "min_calls": 20}


class Caller:
    """Calls a function from a few threads until stopped; records every answer with its
    time, so shares can be measured per step from the answers themselves."""

    def __init__(self, gw: GatewayProcess, name: str, threads: int = 3) -> None:
        self.url = f"{gw.url}/function/{name}"
        self.seen: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                response = http.post(self.url, content=b"ping")
                self.seen.append((time.monotonic(), response.status_code, response.text))
                time.sleep(0.002)

    def failures(self, until: float = float("inf")) -> list[tuple[float, int, str]]:
        return [s for s in self.seen if s[1] != 200 and s[0] <= until]

    def share_of(self, version: str, start: float, end: float) -> tuple[float, int]:
        answers = [s for s in self.seen if start <= s[0] <= end and s[1] == 200]
        if not answers:
            return 0.0, 0
        return 100 * sum(s[2].startswith(version) for s in answers) / len(answers), len(answers)

    def __enter__(self) -> Caller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


class Watcher:
    """Polls the rollout from a thread: (time, state, share) whenever either changes."""

    def __init__(self, gw: GatewayProcess, name: str) -> None:
        self.gw, self.name = gw, name
        self.changes: list[tuple[float, str, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with self.gw.http() as http:
            while not self._stop.is_set():
                data = http.get(f"/system/function/{self.name}/rollout").json()
                change = (data["state"], data.get("share"))
                if not self.changes or self.changes[-1][1:] != change:
                    self.changes.append((time.monotonic(), *change))
                time.sleep(0.05)

    def until(self, state: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, seen, _ in self.changes:
                if seen == state:
                    return when
            time.sleep(0.05)
        raise AssertionError(f"rollout never {state}: {self.changes}")

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def eventually(check, timeout: float = 30, every: float = 0.1):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout}s")


def info(gw: GatewayProcess, name: str) -> dict:
    return gw.http().get(f"/system/function/{name}").json()


def pids_of(gw: GatewayProcess, name: str, version: int) -> list[int]:
    replicas = info(gw, name)["replicas"]["list"]
    return [r["pid"] for r in replicas if f"-v{version}-" in r["id"] and r["pid"]]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def create(gw: GatewayProcess, config: Path, *extra: str, check: bool = True):  # noqa: ANN201
    result = gw.dcf("function", "create", "-f", str(config), *extra, check=check)
    return result


@pytest.fixture(scope="module")
def lgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("rollout") / "home", extra=["--keep-versions", "3"]
    ).start()
    yield gateway
    gateway.stop()


def healthy_rollout(gw: GatewayProcess, root: Path, name: str) -> dict:
    """v1 → v2 through 10%, 50%, 100% under calls; checks shares per step, no failures,
    v1's replicas gone. Returns the rollout as it ended."""
    config = write_function(root, name, VERSIONED.format(v="v1", sleep=0), rollout=FAST)
    create(gw, config)
    gw.wait_status(name, "Ready")
    v1_pids = pids_of(gw, name, 1)
    assert v1_pids
    write_function(root, name, VERSIONED.format(v="v2", sleep=0), rollout=FAST)
    with Caller(gw, name) as caller, Watcher(gw, name) as watcher:
        time.sleep(0.3)
        out = create(gw, config, "--update").stdout.decode()
        assert "canary v2 takes 10% of calls" in out
        try:
            promoted = watcher.until("promoted", 60)
        except AssertionError:
            raise AssertionError(info(gw, name)["rollout"]) from None
        time.sleep(0.5)
    assert not caller.failures(), caller.failures()[:5]
    spans = [c for c in watcher.changes if c[1] == "running"]
    assert [c[2] for c in spans] == [10, 50]
    ends = [c[0] for c in spans[1:]] + [promoted]
    for (start, _, share), end in zip(spans, ends, strict=True):
        measured, count = caller.share_of("v2", start + 0.2, end - 0.2)
        assert count >= 20, (share, count)
        assert abs(measured - share) <= 5, (share, measured, count)
    measured, count = caller.share_of("v2", promoted + 0.2, caller.seen[-1][0])
    assert measured == 100 and count > 0
    eventually(lambda: all(gone(pid) for pid in v1_pids), 30)
    data = gw.http().get(f"/system/function/{name}/rollout").json()
    assert data["state"] == "promoted" and data["canary"] == 2
    return data


def test_a_healthy_canary_follows_its_steps_and_is_promoted(lgw: GatewayProcess, tmp_path: Path):
    healthy_rollout(lgw, tmp_path, "good")
    shown = lgw.dcf("function", "rollout", "good", check=True).stdout.decode()
    assert "canary v2 promoted" in shown and "all calls on v2" in shown
    versions = lgw.http().get("/system/function/good/versions").json()
    assert [(v["version"], v["serving"], v["share"]) for v in versions] == [
        (2, True, 100),
        (1, False, 0),
    ]
    log = lgw.dcf("function", "log", "good", "--tail", "1000", check=True).stdout.decode()
    for event in ("rollout of v2 started", "canary v2 at 50% of calls", "canary v2 promoted"):
        assert event in log, log
    metrics = httpx.get(lgw.url + "/metrics").text
    assert 'dcf_function_version_share{function="good",version="2"} 1.0' in metrics


def test_a_failing_canary_is_aborted_by_itself(lgw: GatewayProcess, tmp_path: Path):
    plan = {"steps": [20, 50, 100], "interval": "2s", "min_calls": 30}
    config = write_function(tmp_path, "bad", VERSIONED.format(v="v1", sleep=0), rollout=plan)
    create(lgw, config)
    lgw.wait_status("bad", "Ready")
    write_function(tmp_path, "bad", FAILING, rollout=plan)
    with Caller(lgw, "bad") as caller, Watcher(lgw, "bad") as watcher:
        create(lgw, config, "--update")
        started = watcher.until("running")
        aborted = watcher.until("aborted", 30)
        time.sleep(1.0)
    # Judged within one interval of reaching min_calls (a call every few ms: at once).
    assert aborted - started < 2.0 + 1.0
    before = [s for s in caller.seen if s[0] <= aborted]
    failures = caller.failures(aborted + 0.5)
    assert failures and all(f[1] == 500 for f in failures)
    assert len(failures) <= 0.2 * len(before) + 2
    after = [s for s in caller.seen if s[0] > aborted + 0.3]
    assert after and all(s[1] == 200 and s[2] == "v1" for s in after)
    data = info(lgw, "bad")
    assert data["status"] == "Ready" and data["version"] == 1
    reason = data["rollout"]["reason"]
    assert re.fullmatch(r"canary v2 aborted: error rate 0\.\d\d vs 0\.00 over \d+ calls", reason)
    assert float(reason.split()[5]) >= 0.2
    assert reason in data["last_error"]
    shown = lgw.dcf("function", "info", "bad", check=True).stdout.decode()
    assert reason in shown
    assert not pids_of(lgw, "bad", 2)


def test_a_slow_canary_is_aborted_on_latency(lgw: GatewayProcess, tmp_path: Path):
    # Two steps before the promotion: a noisy first window (the machine is shared) gets
    # a second look. 40 ms against 120 ms: the load's jitter is small beside either.
    plan = {"steps": [30, 60, 100], "interval": "2s", "min_calls": 30}
    config = write_function(tmp_path, "slow", VERSIONED.format(v="v1", sleep=0.04), rollout=plan)
    create(lgw, config)
    lgw.wait_status("slow", "Ready")
    write_function(tmp_path, "slow", VERSIONED.format(v="v2", sleep=0.12), rollout=plan)
    with Caller(lgw, "slow", threads=3) as caller, Watcher(lgw, "slow") as watcher:
        create(lgw, config, "--update")
        try:
            watcher.until("aborted", 30)
        except AssertionError:
            raise AssertionError(info(lgw, "slow")["rollout"]) from None
    assert not caller.failures()
    reason = info(lgw, "slow")["rollout"]["reason"]
    assert re.fullmatch(
        r"canary v2 aborted: p95 latency [\d.]+ms vs [\d.]+ms \([\d.]+x, at most 1\.5x\)"
        r" over \d+ calls",
        reason,
    ), reason


def test_rollback_under_calls_rebuilds_nothing(lgw: GatewayProcess, tmp_path: Path):
    name = "back"
    build = ["echo built-$RANDOM > built.txt"]
    config = write_function(tmp_path, name, BUILT.format(v="v1"), build=build)
    create(lgw, config)
    lgw.wait_status(name, "Ready")
    v1 = lgw.http().post(f"/function/{name}").text
    write_function(tmp_path, name, BUILT.format(v="v2"), build=build)
    create(lgw, config, "--update")
    lgw.wait_status(name, "Ready")
    assert lgw.http().post(f"/function/{name}").text.startswith("v2:")
    log_before = lgw.dcf("function", "log", name, "--tail", "1000").stdout.decode()
    with Caller(lgw, name) as caller:
        time.sleep(0.3)
        out = lgw.dcf("function", "rollback", name, check=True).stdout.decode()
        time.sleep(0.5)
    assert "version 1 serves" in out
    assert not caller.failures(), caller.failures()[:5]
    # The same build output as before (built.txt holds a random number): nothing rebuilt.
    assert caller.seen[-1][2] == v1
    log = lgw.dcf("function", "log", name, "--tail", "1000").stdout.decode()
    new = log[len(log_before) :] if log.startswith(log_before) else log
    assert "build step 1/1" not in new and "installing" not in new, new
    assert "cached, nothing to run" in new
    # --to a given version; the table shows what serves.
    lgw.dcf("function", "rollback", name, "--to", "2", check=True)
    assert lgw.http().post(f"/function/{name}").text.startswith("v2:")
    table = lgw.dcf("function", "versions", name, check=True).stdout.decode().splitlines()
    assert table[0].split() == ["Version", "Created", "Code", "Serving", "Share"]
    assert table[1].split()[0] == "2" and table[1].split()[-2:] == ["serving", "100%"]
    assert table[2].split()[0] == "1" and table[2].split()[-2:] == ["-", "0%"]
    # Bad rollbacks: clear errors, exit 1.
    refused = lgw.dcf("function", "rollback", name, "--to", "2")
    assert refused.returncode == 1 and "already serving" in refused.stderr.decode()
    with lgw.http() as http:
        r = http.post(f"/system/function/{name}/rollback", json={"to": 9})
        assert r.status_code == 404 and "no version 9 kept (kept: 2, 1)" in r.json()["error"]
        r = http.post(f"/system/function/{name}/rollback", json={"to": "x"})
        assert r.status_code == 400


def test_trimming_keeps_keep_versions(lgw: GatewayProcess, tmp_path: Path):
    config = write_function(tmp_path, "trim", VERSIONED.format(v="v1", sleep=0))
    create(lgw, config)
    for v in (2, 3, 4, 5):
        write_function(tmp_path, "trim", VERSIONED.format(v=f"v{v}", sleep=0))
        create(lgw, config, "--update")
    lgw.wait_status("trim", "Ready")

    def kept() -> list[int]:
        return [v["version"] for v in lgw.http().get("/system/function/trim/versions").json()]

    assert eventually(lambda: kept() == [5, 4, 3], 20)
    home = lgw.home / "functions" / "trim"
    assert eventually(lambda: sorted(p.name for p in home.iterdir()) == ["v3", "v4", "v5"])
    lgw.dcf("function", "rollback", "trim", "--to", "3", check=True)
    assert lgw.http().post("/function/trim").text == "v3"
    refused = lgw.dcf("function", "rollback", "trim", "--to", "1")
    assert refused.returncode == 1 and "no version 1 kept" in refused.stderr.decode()
    # A new version: the oldest one not serving goes (3 serves, so 4 goes).
    write_function(tmp_path, "trim", VERSIONED.format(v="v6", sleep=0))
    create(lgw, config, "--update")
    assert eventually(lambda: kept() == [6, 5, 4] or kept() == [6, 5], 20) and 3 not in kept()


def test_version_header_pins_and_bad_input_is_refused(lgw: GatewayProcess, tmp_path: Path):
    plan = {"steps": [10, 100], "interval": "60s", "min_calls": 1000}
    config = write_function(tmp_path, "pin", VERSIONED.format(v="v1", sleep=0))
    create(lgw, config)
    lgw.wait_status("pin", "Ready")
    with lgw.http() as http:
        r = http.post("/function/pin", headers={"X-DCF-Version": "1"})
        assert r.status_code == 200 and r.text == "v1"
        write_function(tmp_path, "pin", VERSIONED.format(v="v2", sleep=0), rollout=plan)
        create(lgw, config, "--update")
        assert http.get("/system/function/pin/rollout").json()["state"] == "running"
        metrics = http.get("/metrics").text
        assert 'dcf_function_version_share{function="pin",version="1"} 0.9' in metrics
        assert 'dcf_function_version_share{function="pin",version="2"} 0.1' in metrics
        for version in ("1", "2", "1", "2"):
            r = http.post("/function/pin", headers={"X-DCF-Version": version})
            assert r.status_code == 200 and r.text == f"v{version}"
        r = http.post("/function/pin", headers={"X-DCF-Version": "7"})
        assert r.status_code == 404
        assert r.json() == {
            "error": "function 'pin' has no version 7 serving (serving: 1, 2)",
            "function": "pin",
        }
        r = http.post("/function/pin", headers={"X-DCF-Version": "latest"})
        assert r.status_code == 400 and "version number" in r.json()["error"]
        # An update during the rollout: 409, JSON naming why.
        current = http.get("/system/function/pin").json()["spec"]
        body = {"function": {**current, "environment": {}}, "code": ""}
        r = http.put("/system/functions", json=body)
        assert r.status_code == 409 and "rollout of version 2 in progress" in r.json()["error"]
        refused = create(lgw, config, "--update", check=False)
        assert refused.returncode == 1
        assert refused.stderr.decode().count("\n") == 1
        assert "rollout of version 2 in progress" in refused.stderr.decode()
        # Abort by hand: all calls on v1, the canary stopped.
        out = lgw.dcf("function", "abort", "pin", check=True).stdout.decode()
        assert "canary v2 aborted by hand" in out
        assert {http.post("/function/pin").text for _ in range(20)} == {"v1"}
        r = http.post("/system/function/pin/rollout/promote")
        assert r.status_code == 409 and "no rollout in progress" in r.json()["error"]
        # Bad canaries and plans: 400 naming the field.
        for canary in (0, 100, "10"):
            r = http.put("/system/functions", json={**body, "canary": canary})
            assert r.status_code == 400, (canary, r.text)
        bad = {**current, "environment": {}, "rollout": {"steps": [50, 10]}}
        r = http.put("/system/functions", json={"function": bad, "code": ""})
        assert r.status_code == 400 and "steps must increase" in r.json()["error"]
        r = http.post("/system/functions", json={**body, "canary": 10})
        assert r.status_code == 400 and "canary is for an update" in r.json()["error"]
    cli = lgw.dcf("function", "create", "-f", str(config), "--update", "--canary", "150%")
    assert cli.returncode != 0 and "1% to 99%" in cli.stderr.decode()
    cli = lgw.dcf("function", "create", "-f", str(config), "--canary", "10%")
    assert cli.returncode == 1 and "give --update too" in cli.stderr.decode()


def test_a_restarted_gateway_resumes_the_rollout_at_its_step(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home").start()
    try:
        # What is tested is the resume, not the judge: latency on a loaded machine must not
        # abort it, and each step lasts long enough to stop the gateway within it.
        plan = {"steps": [10, 50, 100], "interval": "3s", "min_calls": 5, "max_p95_ratio": 100}
        config = write_function(tmp_path, "resume", VERSIONED.format(v="v1", sleep=0))
        create(gw, config)
        gw.wait_status("resume", "Ready")
        write_function(tmp_path, "resume", VERSIONED.format(v="v2", sleep=0), rollout=plan)
        with Caller(gw, "resume", threads=2) as caller:
            create(gw, config, "--update", "--canary", "10%")

            def at_50() -> bool:
                with gw.http() as http:
                    data = http.get("/system/function/resume/rollout").json()
                assert data["state"] == "running", data  # not aborted, not promoted yet
                return data["share"] == 50

            eventually(at_50, 30, 0.02)
            caller._stop.set()
        gw.stop()
        gw.start()
        data = gw.http().get("/system/function/resume/rollout").json()
        assert (data["state"], data["step"], data["share"], data["canary"]) == (
            "running",
            1,
            50,
            2,
        )
        gw.wait_status("resume", "Ready")
        log = gw.dcf("function", "log", "resume", "--tail", "1000").stdout.decode()
        assert "rollout of v2 resumed: 50% of calls" in log
        with Caller(gw, "resume", threads=2):
            shown = gw.dcf("function", "rollout", "resume", check=True).stdout.decode()
            assert "canary v2 at 50% of calls" in shown
            eventually(
                lambda: (
                    gw.http().get("/system/function/resume/rollout").json()["state"] == "promoted"
                ),
                30,
            )
        assert gw.http().post("/function/resume").text == "v2"
    finally:
        gw.stop()


# The Ray backend: the same rollout and rollback through Ray actors ----------------------


@pytest.fixture(scope="module")
def rgw(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:  # noqa: ANN001
    home = tmp_path_factory.mktemp("ray-rollout") / "home"
    gateway = GatewayProcess(home, extra=["--backend", "ray", "--ray-address", cluster.address])
    gateway.start()
    yield gateway
    gateway.stop()


def test_ray_a_healthy_canary_is_promoted(rgw: GatewayProcess, tmp_path: Path):
    healthy_rollout(rgw, tmp_path, "ray-good")


def test_ray_rollback_under_calls(rgw: GatewayProcess, tmp_path: Path):
    config = write_function(tmp_path, "ray-back", VERSIONED.format(v="v1", sleep=0))
    create(rgw, config)
    rgw.wait_status("ray-back", "Ready")
    write_function(tmp_path, "ray-back", VERSIONED.format(v="v2", sleep=0))
    create(rgw, config, "--update")
    rgw.wait_status("ray-back", "Ready")
    assert rgw.http().post("/function/ray-back").text == "v2"
    with Caller(rgw, "ray-back") as caller:
        time.sleep(0.3)
        rgw.dcf("function", "rollback", "ray-back", "--to", "1", check=True)
        time.sleep(0.5)
    assert not caller.failures(), caller.failures()[:5]
    assert caller.seen[-1][2] == "v1"


def test_each_version_is_sized_to_its_share(lgw: GatewayProcess, tmp_path: Path):
    plan = {"steps": [10, 100], "interval": "60s", "min_calls": 1000}
    replicas = {"min": 2, "max": 2}
    config = write_function(tmp_path, "sized", VERSIONED.format(v="v1", sleep=0), replicas=replicas)
    create(lgw, config)
    lgw.wait_status("sized", "Ready")
    write_function(
        tmp_path, "sized", VERSIONED.format(v="v2", sleep=0), replicas=replicas, rollout=plan
    )
    create(lgw, config, "--update")

    def counts() -> tuple[int, int]:
        ids = [r["id"] for r in info(lgw, "sized")["replicas"]["list"] if r["state"] == "ready"]
        return sum("-v1-" in i for i in ids), sum("-v2-" in i for i in ids)

    # 90% of min 2 is 2 replicas of v1; 10% of it is 1 of v2 (each version has one at least).
    assert eventually(lambda: counts() == (2, 1), 20)
    lgw.dcf("function", "promote", "sized", check=True)
    assert eventually(lambda: counts() == (0, 2), 20)
