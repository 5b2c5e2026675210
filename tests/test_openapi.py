"""The OpenAPI document matches the API: schemathesis, every check, against a real gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ECHO, GatewayProcess, deploy

# A request can match the schema and still be refused with 400 for what a schema cannot
# say: a "code" that is base64 but not a tar.gz, replicas.min above replicas.max. So
# positive_data_acceptance also accepts 400 (and the statuses it accepts by default).
# ``follow=true`` streams the log for as long as the client reads: it has no end for a
# test tool to wait for, so schemathesis asks for the log without it (test_hardening
# covers following).
CONFIG = """
[parameters]
"query.follow" = false

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("openapi")
    gw = GatewayProcess(root / "home", token="schema-token").start()
    deploy(gw, root, "echo", ECHO)
    yield gw
    gw.stop()


def test_openapi_document_is_complete(guarded: GatewayProcess):
    doc = httpx.get(guarded.url + "/openapi.json").json()
    paths = doc["paths"]
    for path in ("/function/{name}", "/async-function/{name}", "/async-function/jobs/{id}"):
        assert path in paths, path
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                 "/v2/models/{name}/ready", "/v2/models/{name}/infer",
                 "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path  # the Open Inference Protocol
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                     "application/octet-stream"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            if "{name}" in path:
                assert "404" in operation["responses"], (method, path)
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    streamed = paths["/function/{name}"]["post"]["responses"]["200"]["content"]
    assert {"text/event-stream", "application/x-ndjson"} <= set(streamed)
    logs = paths["/system/function/{name}/logs"]["get"]["responses"]["200"]["content"]
    assert list(logs) == ["text/plain"]
    deploy_request = doc["components"]["schemas"]["DeployRequest"]["properties"]["function"]
    assert deploy_request["required"] == ["name"]
    assert "409" in paths["/system/functions"]["post"]["responses"]
    for path in ("versions", "rollback", "rollout", "rollout/promote", "rollout/abort"):
        assert f"/system/function/{{name}}/{path}" in paths, path  # versions and rollouts
    assert "409" in paths["/system/function/{name}/rollout/abort"]["post"]["responses"]
    headers = [p["name"] for p in paths["/function/{name}"]["post"]["parameters"]]
    assert "X-DCF-Version" in headers
    assert doc["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    # A 405 lists every method its path serves.
    r = httpx.request("OPTIONS", guarded.url + "/system/function/echo",
                      headers=guarded.headers())
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"


def test_schemathesis_all_checks_find_nothing(guarded: GatewayProcess, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    started = time.monotonic()
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file", str(config),
            "run", guarded.url + "/openapi.json",
            "--checks", "all",
            "--max-examples", "25",
            "--seed", "9",
            "--header", f"Authorization: Bearer {guarded.token}",
            "--generation-database", "none",
            "--request-timeout", "10",
            "--no-color",
            "--report", "ndjson", "--report-ndjson-path", str(tmp_path / "events.ndjson"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    took = time.monotonic() - started
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    events = [json.loads(line) for line in (tmp_path / "events.ndjson").read_text().splitlines()]
    assert len(events) > 10, "schemathesis reported nothing"
    assert took < 90, took
    # The gateway came through it whole (schemathesis may have deleted "echo": it may).
    assert httpx.get(guarded.url + "/healthz").status_code == 200
    deploy(guarded, tmp_path, "after", ECHO)
    assert httpx.post(guarded.url + "/function/after", content=b"still").text == "still"
