"""The seed's workflow and the core contracts, end to end: real gateway, real replicas."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ECHO, GatewayProcess, deploy, free_port, write_function


def info_of(gw: GatewayProcess, name: str) -> dict:
    return gw.http().get(f"/system/function/{name}").json()


def wait_ready_replicas(gw: GatewayProcess, name: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while gw.http().get(f"/system/function/{name}").json()["replicas"]["ready"] != count:
        assert time.monotonic() < deadline, f"{name} never had {count} ready replicas"
        time.sleep(0.1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def test_seed_workflow_init_create_list_call_update_delete(gw: GatewayProcess, root: Path):
    gw.dcf("function", "init", "--runtime", "python3", "seed-fn", cwd=root, check=True)
    assert (root / "seed-fn" / "handler.py").exists()
    assert (root / "seed-fn" / "Dockerfile").exists()
    assert "seed-fn:" in (root / "config.yaml").read_text()

    again = gw.dcf("function", "init", "--runtime", "python3", "seed-fn", cwd=root)
    assert again.returncode == 1 and b"already" in again.stderr

    created = gw.dcf("function", "create", "-f", "config.yaml", "-v", cwd=root, check=True)
    assert b"Ready" in created.stdout
    assert b"environment base" in created.stdout  # -v streams the build output

    listing = gw.dcf("function", "list", check=True).stdout.decode()
    header, *rows = listing.splitlines()
    assert header.split() == ["Function", "Runtime/Image", "Maintainer", "Invocations",
                              "Replicas", "Status"]
    row = next(r for r in rows if r.startswith("seed-fn"))
    assert row.split()[-1] == "Ready"

    called = gw.dcf("function", "call", "seed-fn", input="world\n", check=True)
    assert json.loads(called.stdout) == {"message": "hello, world"}
    invoked = gw.dcf("function", "invoke", "seed-fn", input="again", check=True)
    assert json.loads(invoked.stdout) == {"message": "hello, again"}

    refused = gw.dcf("function", "create", "-f", "config.yaml", cwd=root)
    assert refused.returncode == 1
    assert b"already exists" in refused.stderr and b"--update" in refused.stderr

    handler = root / "seed-fn" / "handler.py"
    handler.write_text(handler.read_text().replace('"hello"', '"hi"'))
    gw.dcf("function", "create", "-f", "config.yaml", "--update", cwd=root, check=True)
    called = gw.dcf("function", "call", "seed-fn", input="world", check=True)
    assert json.loads(called.stdout) == {"message": "hi, world"}
    info = gw.http().get("/system/function/seed-fn").json()
    assert info["version"] == 2 and info["invocations"] == 3

    gw.dcf("function", "delete", "seed-fn", check=True)
    assert "seed-fn" not in gw.dcf("function", "list", check=True).stdout.decode()
    gone = gw.dcf("function", "call", "seed-fn", input="x")
    assert gone.returncode == 1 and b"no function named 'seed-fn'" in gone.stderr


def test_three_handler_forms_and_request_fields(gw: GatewayProcess, root: Path):
    deploy(gw, root, "form-func", """
        def Handler(req):
            return {"input": req.input.decode(), "method": req.method, "query": req.query,
                    "header": req.headers.get("x-test"), "path": req.path,
                    "json": req.json() if req.input.startswith(b"{") else None,
                    "info": req.info}
    """)
    deploy(gw, root, "form-class", """
        class Handler:
            def __init__(self):
                self.loaded = "model"
            def __call__(self, req):
                return f"{self.loaded}:{req.input.decode()}"
    """)
    deploy(gw, root, "form-async", """
        import asyncio, dcf
        async def Handler(req):
            await asyncio.sleep(0.01)
            return dcf.Response(b"made", status=201, headers={"x-made": "yes"})
    """)
    with gw.http() as http:
        r = http.post("/function/form-func/sub/path?a=1&b=two", content=b'{"k": 3}',
                      headers={"x-test": "hdr"})
        assert r.status_code == 200
        body = r.json()
        assert body["input"] == '{"k": 3}' and body["json"] == {"k": 3}
        assert body["method"] == "POST" and body["query"] == {"a": "1", "b": "two"}
        assert body["header"] == "hdr" and body["path"] == "/sub/path"
        assert body["info"]["function"] == "form-func" and body["info"]["version"] == "1"
        r = http.post("/function/form-class", content=b"x")
        assert r.text == "model:x" and r.headers["content-type"].startswith("text/plain")
        r = http.post("/function/form-async")
        assert (r.status_code, r.content, r.headers["x-made"]) == (201, b"made", "yes")
        # Framed with a length, never chunked.
        assert r.headers["content-length"] == "4" and "transfer-encoding" not in r.headers


def test_module_code_runs_once_per_replica(gw: GatewayProcess, root: Path):
    # Counted in the log, not a host file: a sandboxed replica cannot write the host's.
    # Its replica id, not its pid: in a PID namespace of its own every replica may be pid 2.
    deploy(gw, root, "once", """
        import os
        print("import-mark", os.environ["DCF_REPLICA"], flush=True)
        class Handler:
            def __init__(self):
                print("init-mark", os.environ["DCF_REPLICA"], flush=True)
            def __call__(self, req):
                return os.environ["DCF_REPLICA"]
    """, replicas={"min": 2, "max": 2})
    wait_ready_replicas(gw, "once", 2)
    with gw.http() as http:
        replicas = {http.post("/function/once").text for _ in range(40)}
    assert len(replicas) == 2  # both replicas served
    words = gw.dcf("function", "log", "once", check=True).stdout.decode().split()
    marks = [words[i + 1] for i, w in enumerate(words[:-1]) if w.endswith("-mark")]
    assert sorted(marks.count(r) for r in replicas) == [2, 2]  # one import + one __init__ each


def test_handler_exception_is_500_json_and_replica_lives(gw: GatewayProcess, root: Path):
    deploy(gw, root, "raiser", """
        import dcf
        def Handler(req):
            if req.input == b"bad":
                raise dcf.HTTPError(400, "bad input: expected good")
            if req.input == b"boom":
                raise RuntimeError("model exploded")
            return "ok"
    """)
    with gw.http() as http:
        r = http.post("/function/raiser", content=b"boom")
        assert r.status_code == 500
        assert r.json() == {"error": "RuntimeError: model exploded", "function": "raiser"}
        r = http.post("/function/raiser", content=b"bad")
        assert r.status_code == 400
        assert r.json() == {"error": "bad input: expected good", "function": "raiser"}
        assert http.post("/function/raiser", content=b"fine").text == "ok"
    failed = gw.dcf("function", "call", "raiser", input="boom")
    assert failed.returncode == 1 and b"model exploded" in failed.stderr
    assert b"model exploded" in gw.dcf("function", "log", "raiser").stdout  # the traceback


def test_unknown_function_is_404(gw: GatewayProcess):
    with gw.http() as http:
        r = http.post("/function/nope", content=b"x")
        assert r.status_code == 404
        assert r.json() == {"error": "no function named 'nope'", "function": "nope"}
        r = http.get("/system/function/nope")
        assert r.status_code == 404 and "nope" in r.json()["error"]


def test_timeout_is_504(gw: GatewayProcess, root: Path):
    deploy(gw, root, "slow", """
        import time
        def Handler(req):
            time.sleep(float(req.input or 0))
            return "done"
    """, timeout="500ms")
    with gw.http() as http:
        r = http.post("/function/slow", content=b"1.5")
        assert r.status_code == 504
        assert r.json() == {"error": "'slow' did not answer within 0.5s", "function": "slow"}
        # The replica is busy until the slow call ends; then it serves again.
        assert info_of(gw, "slow")["inflight"] == 0
        time.sleep(1.5)
        assert http.post("/function/slow", content=b"0").text == "done"


def test_queue_full_is_429_with_retry_after(gw: GatewayProcess, root: Path):
    deploy(gw, root, "narrow", """
        import time
        def Handler(req):
            time.sleep(0.5)
            return "done"
    """, concurrency=1, max_queue=1)

    def call(_: int) -> httpx.Response:
        return httpx.post(gw.url + "/function/narrow", timeout=30)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(call, range(5)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 2 and codes.count(429) == 3
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert "queue is full" in refused.json()["error"]


def test_update_under_load_drops_no_call(gw: GatewayProcess, root: Path):
    source = """
        import time
        VERSION = "{v}"
        def Handler(req):
            time.sleep(0.005)
            return VERSION
    """
    config = write_function(root, "rolling", source.format(v="v1"), replicas={"min": 2, "max": 2})
    gw.dcf("function", "create", "-f", str(config), check=True)
    gw.wait_status("rolling", "Ready")
    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def hammer() -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            while not stop.is_set():
                r = http.post("/function/rolling")
                seen.append((r.status_code, r.text))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    write_function(root, "rolling", source.format(v="v2"), replicas={"min": 2, "max": 2})
    gw.dcf("function", "create", "-f", str(config), "--update", check=True)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    failures = [s for s in seen if s[0] != 200]
    assert not failures, failures[:5]
    bodies = [text for _, text in seen]
    assert bodies[0] == "v1" and bodies[-1] == "v2"
    assert len(seen) > 50
    # Both versions' replica starts are counted, and the counter never went down.
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'dcf_function_cold_starts_total{function="rolling"} 4.0' in metrics


def test_replica_killed_mid_call_fails_only_its_calls_and_comes_back(gw: GatewayProcess,
                                                                    root: Path):
    deploy(gw, root, "victim", """
        import time
        def Handler(req):
            time.sleep(float(req.input or 0))
            return "ok"
    """, concurrency=4)
    info = gw.http().get("/system/function/victim").json()
    pid = info["replicas"]["list"][0]["pid"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        inflight = [pool.submit(httpx.post, gw.url + "/function/victim", content=b"2",
                                timeout=30) for _ in range(3)]
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        results = [f.result() for f in inflight]
    assert [r.status_code for r in results] == [502, 502, 502]
    assert "failed during the call" in results[0].json()["error"]
    info = gw.wait_status("victim", "Ready", timeout=30)
    assert info["replicas"]["restarts"] == 1
    assert info["replicas"]["list"][0]["pid"] != pid
    assert httpx.post(gw.url + "/function/victim", content=b"0").text == "ok"


def test_os_exit_in_handler_cannot_take_the_gateway_down(gw: GatewayProcess, root: Path):
    deploy(gw, root, "exiter", """
        import os
        def Handler(req):
            if req.input == b"die":
                os._exit(1)
            return "alive"
    """)
    r = httpx.post(gw.url + "/function/exiter", content=b"die", timeout=30)
    assert r.status_code == 502
    assert httpx.get(gw.url + "/healthz").status_code == 200
    gw.wait_status("exiter", "Ready", timeout=30)
    assert httpx.post(gw.url + "/function/exiter", content=b"ok", timeout=30).text == "alive"
    assert "exited with code 1" in gw.dcf("function", "log", "exiter").stdout.decode()


def test_memory_leak_is_contained_by_the_replica_limit(gw: GatewayProcess, root: Path):
    deploy(gw, root, "leaker", """
        hoard = []
        def Handler(req):
            while True:
                hoard.append(bytearray(16 << 20))
    """, limits={"memory": "300Mi"})
    r = httpx.post(gw.url + "/function/leaker", timeout=60)
    assert r.status_code in (500, 502)
    assert httpx.get(gw.url + "/healthz").status_code == 200
    assert gw.http().get("/system/functions").status_code == 200


def test_import_error_is_failed_with_traceback_and_no_restart_loop(gw: GatewayProcess,
                                                                  root: Path):
    config = write_function(root, "broken", """
        import numpy_that_does_not_exist
        def Handler(req):
            return "never"
    """)
    created = gw.dcf("function", "create", "-f", str(config), "broken")
    assert created.returncode == 1
    assert b"Failed" in created.stderr
    info = gw.wait_status("broken", "Failed")
    assert "ModuleNotFoundError" in info["failure"]
    assert "numpy_that_does_not_exist" in info["failure"]
    shown = gw.dcf("function", "info", "broken").stdout.decode()
    assert "Failed" in shown and "numpy_that_does_not_exist" in shown
    assert "numpy_that_does_not_exist" in gw.dcf("function", "log", "broken").stdout.decode()
    time.sleep(1.5)
    info = gw.http().get("/system/function/broken").json()
    assert info["status"] == "Failed" and info["replicas"]["list"] == []
    log = gw.dcf("function", "log", "broken").stdout.decode()
    assert log.count("starting replica") == 1  # no restart loop
    r = httpx.post(gw.url + "/function/broken")
    assert r.status_code == 503 and "failed to start" in r.json()["error"]
    # Fixing the code and updating brings it back.
    write_function(root, "broken", "def Handler(req):\n    return 'fixed'\n")
    gw.dcf("function", "create", "-f", str(config), "--update", "broken", check=True)
    assert httpx.post(gw.url + "/function/broken").text == "fixed"


def test_failed_update_keeps_the_old_version_serving(gw: GatewayProcess, root: Path):
    config = write_function(root, "steady", "def Handler(req):\n    return 'v1'\n")
    gw.dcf("function", "create", "-f", str(config), "steady", check=True)
    write_function(root, "steady", "raise SystemExit('cannot load model')\n")
    result = gw.dcf("function", "create", "-f", str(config), "--update", "steady")
    assert result.returncode == 1 and b"still serving version 1" in result.stderr
    assert httpx.post(gw.url + "/function/steady").text == "v1"
    info = gw.http().get("/system/function/steady").json()
    assert info["status"] == "Ready" and "cannot load model" in info["last_error"]


def test_scale_sets_bounds_at_run_time(gw: GatewayProcess, root: Path):
    deploy(gw, root, "scalable", ECHO)
    out = gw.dcf("function", "scale", "scalable", "--min", "2", "--max", "3", check=True)
    assert b"min 2, max 3" in out.stdout
    wait_ready_replicas(gw, "scalable", 2)
    bad = gw.dcf("function", "scale", "scalable", "--min", "3", "--max", "1")
    assert bad.returncode == 1 and b"min (3) is more than max (1)" in bad.stderr
    r = gw.http().post("/system/function/scalable/scale", json={"min": "x"})
    assert r.status_code == 400 and "min" in r.json()["error"]


def test_async_invocation_returns_a_job(gw: GatewayProcess, root: Path):
    deploy(gw, root, "jobber", "def Handler(req):\n    return req.input.upper()\n")
    with gw.http() as http:
        r = http.post("/async-function/jobber", content=b"later")
        assert r.status_code == 202
        job = r.json()["id"]
        deadline = time.monotonic() + 10
        while (r := http.get(f"/async-function/jobs/{job}")).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 200 and r.content == b"LATER"
        assert http.get("/async-function/jobs/nope").status_code == 404
        assert http.post("/async-function/missing").status_code == 404


def test_bad_config_files_name_file_function_and_field(gw: GatewayProcess, root: Path):
    (root / "fn").mkdir()
    (root / "fn" / "handler.py").write_text("def Handler(req):\n    return 1\n")
    cases = {
        "unknown key": ("functions:\n  fn:\n    handler: {dir: ./fn}\n    colour: red\n",
                        "function 'fn': field 'colour': unknown key 'colour'"),
        "wrong type": ("functions:\n  fn:\n    handler: {dir: ./fn}\n    replicas: {min: lots}\n",
                       "function 'fn': field 'replicas.min'"),
        "missing dir": ("functions:\n  fn:\n    handler: {dir: ./nowhere}\n",
                        "function 'fn': field 'handler.dir': directory"),
        "bad timeout": ("functions:\n  fn:\n    handler: {dir: ./fn}\n    timeout: soon\n",
                        "field 'timeout': 'soon' is not a duration"),
        "bad stream idle": ("functions:\n  fn:\n    handler: {dir: ./fn}\n"
                            "    stream_idle_timeout: 0\n",
                            "field 'stream_idle_timeout': must be more than zero"),
        "bad name": ("functions:\n  Bad_Name:\n    handler: {dir: ./fn}\n",
                     "is not a valid function name"),
        "top level": ("functoins:\n  fn: {}\n", "unknown key 'functoins'"),
        "not yaml": ("functions: [\n", "not valid YAML"),
    }
    for label, (text, expected) in cases.items():
        path = root / f"{label.replace(' ', '-')}.yaml"
        path.write_text(text)
        result = gw.dcf("function", "create", "-f", str(path))
        assert result.returncode == 1, label
        err = result.stderr.decode()
        assert str(path) in err and expected in err, (label, err)
        assert "Traceback" not in err
    missing = gw.dcf("function", "create", "-f", str(root / "absent.yaml"))
    assert missing.returncode == 1 and b"no such file" in missing.stderr
    assert all(f["name"] != "fn" for f in gw.http().get("/system/functions").json())


def test_api_rejects_bad_deploy_requests_with_clear_errors(gw: GatewayProcess):
    with gw.http() as http:
        r = http.post("/system/functions", json={"function": {"name": "x"}, "code": "%%%"})
        assert r.status_code == 400 and "'code' is not valid base64" in r.json()["error"]
        r = http.post("/system/functions", json={"function": {"name": "x"}, "code": "aGVsbG8="})
        assert r.status_code == 400 and "not a valid tar.gz" in r.json()["error"]
        r = http.post("/system/functions", json={"function": {"name": "x", "replicas": 3},
                                                 "code": ""})
        assert r.status_code == 400 and "replicas" in r.json()["error"]
        r = http.post("/system/functions", content=b"not json",
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and "invalid request" in r.json()["error"]


def test_gateway_unreachable_is_one_line(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home")  # never started
    result = gw.dcf("function", "list")
    assert result.returncode == 1
    err = result.stderr.decode().strip()
    assert err == f"error: cannot reach the DCF gateway at http://{gw.address} (ConnectError)"


def test_body_over_limit_is_413(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home", extra=["--max-body", "1000"]).start()
    try:
        deploy(gw, tmp_path, "small", ECHO)
        assert httpx.post(gw.url + "/function/small", content=b"x" * 1000).status_code == 200
        r = httpx.post(gw.url + "/function/small", content=b"x" * 1001)
        assert r.status_code == 413
        assert "larger than the gateway's limit of 1000 bytes" in r.json()["error"]

        def chunks():
            for _ in range(10):
                yield b"y" * 500

        r = httpx.post(gw.url + "/function/small", content=chunks())  # no content-length
        assert r.status_code == 413
        assert httpx.post(gw.url + "/function/small", content=b"ok").content == b"ok"
    finally:
        gw.stop()


def test_token_protects_management_but_not_invocations(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home", token="s3cret").start()
    try:
        deploy(gw, tmp_path, "guarded", ECHO)  # the CLI sends DCF_TOKEN
        r = httpx.get(gw.url + "/system/functions")
        assert r.status_code == 401 and "token" in r.json()["error"]
        r = httpx.get(gw.url + "/system/functions", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.post(gw.url + "/function/guarded", content=b"hi").content == b"hi"
        env_free = GatewayProcess(gw.home)
        env_free.port, env_free.address = gw.port, gw.address
        result = env_free.dcf("function", "list")
        assert result.returncode == 1 and b"needs a token" in result.stderr
        assert env_free.dcf("function", "list", "--token", "s3cret").returncode == 0
    finally:
        gw.stop()


def test_gateway_restart_brings_functions_back(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home").start()
    try:
        deploy(gw, tmp_path, "durable", ECHO, replicas={"min": 2, "max": 2})
        for _ in range(3):
            assert httpx.post(gw.url + "/function/durable", content=b"a").content == b"a"
        old_pids = {r["pid"] for r in gw.http().get("/system/function/durable").json()
                    ["replicas"]["list"]}
        gw.stop()
        for pid in old_pids:  # replicas end with the gateway
            deadline = time.monotonic() + 5
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not Path(f"/proc/{pid}").exists()
        gw.start()
        info = gw.wait_status("durable", "Ready", timeout=30)
        assert info["invocations"] == 3
        assert httpx.post(gw.url + "/function/durable", content=b"b").content == b"b"
    finally:
        gw.stop()


def test_unavailable_backend_is_refused_clearly(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home")
    # No cluster at that address (or, without the extra, no Ray at all): one line, exit 1.
    closed = f"127.0.0.1:{free_port()}"
    start = ("gateway", "start", "--backend", "ray", "--isolation", "process")
    result = gw.dcf(*start, "--ray-address", closed)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"no Ray cluster answers at {closed}" in lines[0] or "dcf[ray]" in lines[0]

    # Ray not installed: the line names the missing extra.
    hide_ray = "import sys; sys.modules['ray'] = None; from dcf.cli.main import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", hide_ray, *start],
        capture_output=True,
        env=gw.env(),
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines == ["Error: the ray backend needs Ray on this host: pip install 'dcf[ray]'"
                     " (import of ray halted; None in sys.modules)"], lines
