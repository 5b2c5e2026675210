"""Pure logic: config parsing, routing choices, batching, result rendering."""

from __future__ import annotations

import asyncio
import time

import pytest

import dcf
from dcf.config import ConfigError, load_project, parse_duration, parse_function, parse_memory
from dcf.gateway.build.environments import env_hash, normalise
from dcf.gateway.routing.router import CallError, Pool, ReplicaLink
from dcf.runtime.batching import Batcher, BatchOptions
from dcf.runtime.handler import Invoker, render

# config ------------------------------------------------------------------------


def test_seed_fields_and_defaults():
    spec = parse_function(
        {"runtime": "python3", "desc": "d", "maintainer": "m", "image": "img",
         "handler": {"dir": "./x", "file": "h.py", "name": "H"},
         "environment": ["A=1", "B=x=y"], "limits": {"cpu": "500m", "memory": "1Gi", "gpu": "1"},
         "requests": {"cpu": 1, "memory": "512Mi"}, "build_args": {"K": 1}, "skip_build": True},
        "seed-fn",
    )
    assert spec.environment == {"A": "1", "B": "x=y"}
    assert spec.limits.cpu == 0.5 and spec.limits.memory == 1 << 30 and spec.limits.gpu == 1
    assert spec.requests.memory == 512 << 20
    assert spec.replicas.min == 1 and spec.replicas.max == 1
    assert spec.concurrency == 4 and spec.timeout == 30.0


@pytest.mark.parametrize(("value", "seconds"), [("30s", 30), ("500ms", 0.5), ("2m", 120), (5, 5)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


def test_memory_units():
    assert parse_memory("1G") == 10**9 and parse_memory("2Ki") == 2048 and parse_memory(10) == 10
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory("lots")


@pytest.mark.parametrize(("settings", "message"), [
    ({"colour": "red"}, "field 'colour': unknown key 'colour'"),
    ({"handler": {"dri": "."}}, "field 'handler.dri': unknown key"),
    ({"replicas": {"min": 2, "max": 1}}, "max (1) is less than min (2)"),
    ({"concurrency": 0}, "field 'concurrency'"),
    ({"environment": ["NOEQUALS"]}, "'KEY=value'"),
    ({"runtime": "ruby"}, "unknown runtime 'ruby'"),
    ({"timeout": "-1s"}, "field 'timeout'"),
])
def test_bad_settings_name_file_function_and_field(settings, message):
    with pytest.raises(ConfigError) as err:
        parse_function(settings, "fn", "conf.yaml")
    assert str(err.value).startswith("conf.yaml: function 'fn': field ")
    assert message in str(err.value)


def test_project_reads_gateway_and_checks_handler_dir(tmp_path):
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "handler.py").write_text("")
    path = tmp_path / "config.yaml"
    path.write_text("dcf:\n  gateway: h:1\nfunctions:\n  fn:\n    handler: {dir: ./fn}\n")
    project = load_project(path)
    assert project.gateway == "h:1" and project.handler_dir("fn") == tmp_path / "fn"
    path.write_text("functions:\n  fn:\n    handler: {dir: ./fn, file: nope.py}\n")
    with pytest.raises(ConfigError, match="field 'handler.file'"):
        load_project(path)


def test_requirements_hash_ignores_order_and_comments():
    assert env_hash("") == env_hash("# only a comment\n\n") == "base"
    assert env_hash("numpy\nopencv # why\n") == env_hash("opencv\n\nnumpy\n")
    assert env_hash("numpy") != env_hash("numpy==2.0")
    assert normalise("a\n# c\nb  # d\n") == ["a", "b"]


# routing -----------------------------------------------------------------------


def test_least_outstanding_then_round_robin():
    pool = Pool("f", max_queue=10, timeout=5)
    a, b = ReplicaLink("a", "/a", 2), ReplicaLink("b", "/b", 2)
    pool.add(a)
    pool.add(b)
    a.inflight = 1
    assert pool._pick() is b
    b.inflight = 1
    picks = {pool._pick().id for _ in range(4)}
    assert picks == {"a", "b"}  # ties spread
    a.inflight = b.inflight = 2
    assert pool._pick() is None  # every slot taken


def test_queue_hands_a_freed_slot_to_the_oldest_waiter_and_refuses_when_full():
    async def scenario():
        pool = Pool("f", max_queue=2, timeout=5)
        link = ReplicaLink("a", "/a", 1)
        pool.add(link)
        first = await pool._wait()
        w1 = asyncio.ensure_future(pool._wait())
        w2 = asyncio.ensure_future(pool._wait())
        await asyncio.sleep(0)
        with pytest.raises(CallError) as full:
            await pool._wait()
        assert full.value.status == 429 and full.value.retry_after == 1
        pool._release(first)
        assert await w1 is link and not w2.done()
        pool._release(link)
        assert await w2 is link and link.inflight == 1

    asyncio.run(scenario())


def test_no_replica_and_none_coming_is_503():
    async def scenario():
        pool = Pool("f", max_queue=2, timeout=5)
        pool.unavailable = "the function failed to start"
        with pytest.raises(CallError) as err:
            await pool._wait()
        assert err.value.status == 503 and "failed to start" in err.value.message

    asyncio.run(scenario())


# batching ----------------------------------------------------------------------


def run_batched(items, handler, max_size=4, max_wait_ms=5, sizes=None):
    sizes = [] if sizes is None else sizes

    async def scenario():
        batches = []

        async def run(batch):
            batches.append(list(batch))
            return handler(batch)

        batcher = Batcher(run, BatchOptions(max_size, max_wait_ms))
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in items),
                                        return_exceptions=True)
        sizes.extend(o[1] for o in outcomes if isinstance(o, tuple) and o[1])
        return [o[0] if isinstance(o, tuple) else o for o in outcomes], batches

    return asyncio.run(scenario())


def test_batches_keep_order_and_size():
    sizes: list[int] = []
    results, batches = run_batched(list(range(10)), lambda b: [x * 10 for x in b], sizes=sizes)
    assert results == [x * 10 for x in range(10)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sizes) == [2, 4, 4]  # each batch's size reported once, for the metrics


def test_a_bad_item_fails_alone():
    def handler(batch):
        return [dcf.HTTPError(400, "odd") if x % 2 else x for x in batch]

    results, _ = run_batched(list(range(4)), handler)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], dcf.HTTPError) and results[1].status == 400


def test_a_raising_batch_is_retried_item_by_item():
    def handler(batch):
        if 3 in batch:
            raise ValueError("cannot take 3")
        return batch

    results, batches = run_batched([1, 2, 3, 4], handler)
    assert results[:2] == [1, 2] and results[3] == 4
    assert isinstance(results[2], ValueError)


def test_wrong_length_is_an_error_for_every_call():
    results, _ = run_batched([1, 2], lambda b: b[:1])
    assert all("one result per request" in str(r) for r in results)


def test_batch_decorator_on_a_class_call_is_honoured():
    class Model:
        @dcf.batch(max_size=8, max_wait_ms=1)
        def __call__(self, reqs):
            return [len(reqs)] * len(reqs)

    invoker = Invoker(Model(), "m")
    assert invoker.batcher is not None

    async def scenario():
        return await asyncio.gather(*(invoker(dcf.Request(input=b"x")) for _ in range(8)))

    results = asyncio.run(scenario())
    assert all(status == 200 for status, _, _ in results)
    assert max(int(body) for _, _, body in results) > 1  # calls were grouped


def test_sync_handlers_run_inline_unless_threads_are_asked_for():
    import threading

    def where(req):
        return threading.current_thread().name

    assert Invoker(where, "f").inline
    assert Invoker(where, "f").call_now(dcf.Request())[2] == b"MainThread"
    threaded = Invoker(where, "f", threads=2)
    assert not threaded.inline
    assert asyncio.run(threaded(dcf.Request()))[2] != b"MainThread"


def test_batch_options_are_validated():
    with pytest.raises(ValueError, match="max_size"):
        dcf.batch(max_size=0)


# rendering -------------------------------------------------------------------------


def test_results_render_by_type():
    assert render({"a": 1}) == (200, [("content-type", "application/json")], b'{"a": 1}')
    assert render("hi")[2] == b"hi" and render("hi")[1][0][1].startswith("text/plain")
    assert render(b"\x00")[1] == [("content-type", "application/octet-stream")]
    status, headers, body = render(dcf.Response({"x": 1}, 201, {"X-Y": "z"}))
    assert status == 201 and ("x-y", "z") in headers and body == b'{"x": 1}'


def test_latency_quantiles_cover_the_recent_window_and_the_lifetime():
    from dcf.gateway.observe.metrics import Metrics

    metrics = Metrics()
    for _ in range(100):
        metrics.observe("f", 200, 0.003)
    assert 0.0025 < metrics.latency_quantiles("f")["p50"] <= 0.005  # young gateway: all recent
    metrics.tick(time.monotonic() - 61)  # a snapshot a full window old: the baseline
    for _ in range(100):
        metrics.observe("f", 200, 0.2)
    recent, total = metrics.latency_quantiles("f"), metrics.latency_quantiles("f", recent=False)
    assert 0.1 < recent["p50"] <= 0.25 and total["p50"] <= 0.005
    assert metrics.latency_quantiles("nobody") == {"p50": None, "p99": None}


def test_frames_survive_any_chunking_of_the_stream():
    import random

    from dcf import wire

    rng = random.Random(7)
    sent = []
    for call_id in range(1, 120):
        body = rng.randbytes(rng.choice([0, 5, 70_000, 65_536, 300_000]))
        sent.append((call_id, 200 + call_id % 3, call_id % 5, [("x-a", "b:c"), ("k", "")], body))
    stream = b"".join(b"".join(wire.response_frame(i, s, h, b, n)) for i, s, n, h, b in sent)
    reader = wire.FrameReader(wire.RESPONSE_HEAD)
    got, pos = [], 0
    while pos < len(stream):
        step = rng.choice([1, 7, 13, 100, 65_536, 65_537, 200_000])
        got.extend(reader.feed(stream[pos:pos + step]))
        pos += step
    assert [(i, s, n, wire.parse_response_meta(m), b) for i, s, n, m, b in got] == sent
    method, path, query, headers = wire.parse_request_meta(
        wire.request_frame(1, "POST", "/p", "a=1", [("h", "v:w")], b"")[1]
    )
    assert (method, path, query, headers) == ("POST", "/p", "a=1", [("h", "v:w")])


def test_a_lone_call_is_not_held_for_company():
    async def scenario():
        async def run(batch):
            return batch

        batcher = Batcher(run, BatchOptions(16, 500))
        start = time.perf_counter()
        for i in range(3):
            assert await batcher.submit(i) == (i, 1)
        return time.perf_counter() - start

    assert asyncio.run(scenario()) < 0.75  # waiting would take 1.5 s: behaviour, not speed


# canary rollouts: the plan, the split, the judge -------------------------------------


def test_rollout_plans_are_validated_and_end_at_100():
    from dcf.config import Rollout

    assert Rollout().steps == [10, 50, 100]
    assert Rollout(steps=[5, 25]).steps == [5, 25, 100]
    assert Rollout(steps=[10, 50, 100]).starting_at(30).steps == [30, 50, 100]
    for steps, message in (
        ([50, 10], "must increase"),
        ([0, 50], "from 1 to 100"),
        ([100], "below 100"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_function({"rollout": {"steps": steps}}, "f")
    with pytest.raises(ConfigError, match="unknown key 'rollout.every'"):
        parse_function({"rollout": {"every": "2s"}}, "f")
    with pytest.raises(ValueError, match="1% to 99%"):
        Rollout().starting_at(100)
    assert parse_function({"rollout": {"interval": "2s"}}, "f").rollout.interval == 2.0


def test_split_deals_out_exactly_the_canary_share():
    from dcf.gateway.routing.split import Split

    split = Split(Pool("f", 1, 1.0), 1, Pool("f", 1, 1.0), 2, 10)
    picks = [split._next_is_canary() for _ in range(100)]
    assert sum(picks) == 10 and not any(picks[:9])
    split.set_share(50)
    assert sum(split._next_is_canary() for _ in range(10)) == 5


def test_the_judge_compares_the_canary_with_stable_over_one_window():
    from dcf.config import Rollout
    from dcf.gateway.lifecycle.rollout import judge
    from dcf.gateway.routing.split import Window

    def window(calls: int, errors: int, seconds: float) -> Window:
        w = Window()
        for i in range(calls):
            w.add(500 if i < errors else 200, seconds)
        return w

    plan = Rollout(min_calls=50)
    assert judge(plan, 2, window(49, 0, 0.01), window(500, 0, 0.01)).outcome == "wait"
    assert judge(plan, 2, window(100, 1, 0.01), window(500, 0, 0.01)).outcome == "pass"
    failed = judge(plan, 2, window(100, 31, 0.01), window(500, 0, 0.01))
    assert failed.outcome == "fail"
    assert failed.reason == "canary v2 aborted: error rate 0.31 vs 0.00 over 100 calls"
    # Errors the stable version has too are not the canary's fault.
    assert judge(plan, 2, window(100, 10, 0.01), window(500, 50, 0.01)).outcome == "pass"
    # 4xx are the caller's: not errors.
    four = Window()
    for _ in range(100):
        four.add(404, 0.01)
    assert four.errors == 0
    slow = judge(plan, 2, window(100, 0, 0.09), window(500, 0, 0.03))
    assert slow.outcome == "fail" and "p95 latency 90.0ms vs 30.0ms (3.0x" in slow.reason
    # Before the interval's end only errors count: a p95 of few calls is noise.
    assert judge(plan, 2, window(100, 0, 0.09), window(500, 0, 0.03), latency=False).outcome == (
        "pass"
    )
    # Below the floor, a ratio is noise.
    assert judge(plan, 2, window(100, 0, 0.003), window(500, 0, 0.001)).outcome == "pass"


@pytest.mark.parametrize("value", ["0", "-1", "101"])
def test_bench_repeats_out_of_range_is_refused_naming_the_option(value, capsys):
    from bench.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["tracing", "--repeats", value])
    assert exit_.value.code == 2
    assert f"--repeats must be from 1 to 100, not {value}" in capsys.readouterr().err


def test_bench_repeats_sets_the_rounds_of_every_echo_cell():
    from pathlib import Path

    from bench.__main__ import parse_args
    from bench.context import Context

    def rounds(*argv: str) -> int:
        args = parse_args(["tracing", *argv])
        context = Context(args.quick, False, Path("."), 0, rounds=args.repeats)
        return context.repeats

    assert (rounds(), rounds("--quick"), rounds("--repeats", "10")) == (3, 1, 10)
