"""Scale-down drains on the ray backend too (issue 17, defect 1): the same Deployment
code retires a Ray actor only after the calls in flight on it have answered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, deploy
from tests.test_drain import SLOW, busy, load, wait_members

pytest.importorskip("ray", reason="the ray backend's tests need pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def rgw(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:  # noqa: ANN001
    home = tmp_path_factory.mktemp("ray-drain") / "home"
    gateway = GatewayProcess(home, extra=["--backend", "ray", "--ray-address", cluster.address])
    gateway.start()
    yield gateway
    gateway.stop()


def test_ray_scale_down_under_load_fails_no_call(rgw: GatewayProcess, tmp_path: Path) -> None:
    deploy(rgw, tmp_path, "raydrain", SLOW, concurrency=2, replicas={"min": 3, "max": 3})
    with load(rgw, "raydrain") as running:
        running.set(6)
        busy(rgw, "raydrain", 6)
        rgw.dcf("function", "scale", "raydrain", "--min", "2", "--max", "2", check=True)
        wait_members(rgw, "raydrain", 2)
        busy(rgw, "raydrain", 4)
        rgw.dcf("function", "scale", "raydrain", "--min", "1", "--max", "1", check=True)
        wait_members(rgw, "raydrain", 1)
    assert running.failed == 0, (running.codes, running.errors[:3])
    assert running.codes[200] > 10
    rgw.dcf("function", "delete", "raydrain", check=True)
