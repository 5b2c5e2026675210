"""The tables the bench prints (markdown) and the targets, each a ratio from the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def get(data: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ms(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _x(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}×" if value < 10 else f"{value:.0f}×"


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        cells = [
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- echo --------------------------------------------------------------------------------------


def _echo_rows(results: dict) -> list[tuple[str, dict | None]]:
    echo = results.get("echo") or {}
    ray = results.get("ray") or {}
    rows = [
        ("bare uvicorn+Starlette echo (1 hop)", echo.get("bare")),
        ("DCF replica alone, HTTP (python -m dcf.runtime)", echo.get("replica-http")),
        ("DCF replica alone, framed socket [asyncio gen]", echo.get("replica-framed")),
        ("DCF gateway → replica (async echo, concurrency 64)", echo.get("gateway")),
        ("DCF gateway → replica (sync seed-form echo, conc. 4)", echo.get("gateway-sync")),
        ("DCF gateway, Ray backend → replica actor over TCP", get(results, "raybackend", "echo")),
        ("DCF gateway, local backend, in turns with ↑", get(results, "raybackend", "local-echo")),
        ("Ray Serve, HTTP proxy", get(ray, "proxy", "echo")),
        ("Ray Serve, throughput-optimized, replica's port", get(ray, "direct", "echo")),
        ("bare uvicorn+Starlette [asyncio gen]", echo.get("bare-pygen")),
        ("DCF gateway [asyncio gen]", echo.get("gateway-pygen")),
    ]
    return [(label, data) for label, data in rows if data]


def _cpu(run: dict | None) -> str:
    cpu = get(run, "cpu_us_per_req")
    if not cpu:
        return "–"
    parts = [f"{v:.0f}" for v in cpu.values()]
    return (f"{sum(cpu.values()):.0f} (" + "+".join(parts) + ")") if len(parts) > 1 else parts[0]


def echo_table(results: dict) -> str:
    header = [
        "echo, 100 B body",
        "p50 ms @1",
        "p99 ms @1",
        "req/s @1",
        "req/s @8",
        "p50 ms @8",
        "req/s @64",
        "p99 ms @64",
        "req/s 600KB @8",
        "CPU µs/req @8",
    ]
    rows = []
    for label, d in _echo_rows(results):
        rows.append(
            [
                label,
                _ms(get(d, "c1", "p50_ms")),
                _ms(get(d, "c1", "p99_ms")),
                _num(get(d, "c1", "rps")),
                _num(get(d, "c8", "rps")),
                _ms(get(d, "c8", "p50_ms")),
                _num(get(d, "c64", "rps")),
                _ms(get(d, "c64", "p99_ms")),
                _num(get(d, "big_c8", "rps")),
                _cpu(get(d, "c8")),
            ]
        )
    return _table(header, rows)


def unpinned_table(results: dict) -> str | None:
    echo = results.get("echo") or {}
    rows = [
        [
            label,
            _num(get(echo, key, "c8_unpinned", "rps")),
            _ms(get(echo, key, "c8_unpinned", "p50_ms")),
        ]
        for key, label in (
            ("bare", "bare uvicorn+Starlette"),
            ("replica-http", "DCF replica alone, HTTP"),
            ("gateway", "DCF gateway → replica"),
        )
        if get(echo, key, "c8_unpinned")
    ]
    if not rows:
        return None
    return _table(["echo @8, nothing pinned", "req/s", "p50 ms"], rows)


# -- SSD ---------------------------------------------------------------------------------------


def ssd_table(results: dict) -> str | None:
    ssd = results.get("ssd") or {}
    ray = results.get("ray") or {}
    if "skipped" in ssd:
        ssd = {}
    inproc = ssd.get("in-process") or {}
    rows_def = [
        ("in-process, one image per call (threads)", inproc.get("c1"), inproc.get("c8")),
        ("in-process, batches of 8 (example's batch path)", None, inproc.get("batch_c8")),
        (
            "DCF gateway, unbatched (concurrency 8)",
            get(ssd, "gateway", "c1"),
            get(ssd, "gateway", "c8"),
        ),
        (
            "DCF gateway, @dcf.batch(16, 5 ms), concurrency 16",
            get(ssd, "gateway-batch", "c1"),
            get(ssd, "gateway-batch", "c8"),
        ),
        ("DCF gateway, example as shipped (ssd-test)", None, get(ssd, "gateway-example", "c8")),
        (
            "DCF gateway, Ray backend, example as shipped",
            None,
            get(results, "raybackend", "ssd", "c8"),
        ),
        (
            "DCF gateway, local backend, example, in turns with ↑",
            None,
            get(results, "raybackend", "local-ssd", "c8"),
        ),
        (
            "Ray Serve proxy, unbatched",
            get(ray, "proxy", "ssd", "c1"),
            get(ray, "proxy", "ssd", "c8"),
        ),
        (
            "Ray Serve proxy, @serve.batch(16, 5 ms)",
            get(ray, "proxy", "ssd-batch", "c1"),
            get(ray, "proxy", "ssd-batch", "c8"),
        ),
        (
            "Ray Serve direct (throughput-opt.), unbatched",
            get(ray, "direct", "ssd", "c1"),
            get(ray, "direct", "ssd", "c8"),
        ),
        (
            "Ray Serve direct (throughput-opt.), batched",
            get(ray, "direct", "ssd-batch", "c1"),
            get(ray, "direct", "ssd-batch", "c8"),
        ),
    ]
    rows = []
    for label, c1, c8 in rows_def:
        if not c1 and not c8:
            continue
        rows.append(
            [
                label,
                _num(get(c1, "rps"), 1),
                _ms(get(c1, "p50_ms")),
                _num(get(c8, "rps"), 1),
                _ms(get(c8, "p50_ms")),
                _ms(get(c8, "p99_ms")),
                str((get(c1, "errors") or 0) + (get(c8, "errors") or 0)),
            ]
        )
    if not rows:
        return None
    header = [
        "SSD (base64 JPEG → boxes)",
        "img/s @1",
        "p50 ms @1",
        "img/s @8",
        "p50 ms @8",
        "p99 ms @8",
        "errors",
    ]
    return _table(header, rows)


# -- cold start and memory ---------------------------------------------------------------------


def lifecycle_table(results: dict) -> str | None:
    cold = results.get("coldstart") or {}
    mem = results.get("memory") or {}
    ray = results.get("ray") or {}
    rows = []

    def add(label: str, value: str, note: str = "") -> None:
        rows.append([label, value, note])

    if cold and "skipped" not in cold:
        add(
            "create → Ready, echo, cached env (client)",
            f"{_num(cold.get('create_ready_median_s'), 2)} s",
            f"runs {cold.get('create_ready_s')}",
        )
        add(
            "`dcf function create -f config.yaml` (whole CLI)",
            f"{_num(cold.get('cli_create_s'), 2)} s",
        )
        z = cold.get("from_zero_echo") or {}
        add(
            "scale-from-zero → first answer, echo",
            f"{_num(z.get('median_s'), 3)} s",
            f"runs {z.get('first_answer_s')}; "
            f"warm call {_ms((z.get('warm_call_s') or 0) * 1000)} ms",
        )
        if cold.get("ssd_create_ready_s") is not None:
            load = (cold.get("ssd_model_load_s") or 0) + (cold.get("ssd_import_s") or 0)
            add(
                "create → Ready, SSD",
                f"{_num(cold.get('ssd_create_ready_s'), 2)} s",
                f"model import+load in-process {load:.2f} s",
            )
            zs = cold.get("from_zero_ssd") or {}
            add(
                "scale-from-zero → first answer, SSD",
                f"{_num(zs.get('median_s'), 3)} s",
                f"runs {zs.get('first_answer_s')}",
            )
    for mode in ("proxy", "direct"):
        info = get(ray, mode, "info")
        if info:
            add(
                f"Ray Serve ({mode}): nothing → first answer",
                f"{_num(info.get('start_to_first_answer_s'), 2)} s",
                "ray.init + serve.start + echo app",
            )
    if mem and "skipped" not in mem:
        add("gateway RSS, idle (no function)", f"{_num(mem.get('idle_rss_mb'), 1)} MB")
        add("gateway RSS, 10 functions deployed", f"{_num(mem.get('rss_10_functions_mb'), 1)} MB")
        add(
            f"gateway RSS, after {mem.get('calls')} calls + /metrics",
            f"{_num(mem.get('rss_after_calls_mb'), 1)} MB",
            f"peak (VmHWM) {_num(mem.get('peak_rss_mb'), 1)} MB",
        )
        add(
            "gateway + 10 replicas, all processes",
            f"{_num(mem.get('total_rss_mb'), 0)} MB",
            f"{_num(mem.get('replica_rss_mb_each'), 1)} MB per echo replica",
        )
    for mode in ("proxy", "direct"):
        rss = get(ray, mode, "rss_mb_all_processes")
        if rss:
            add(f"Ray Serve ({mode}), all processes, 3 apps", f"{_num(rss, 0)} MB")
    rb = results.get("raybackend") or {}
    cluster = rb.get("cluster")
    if cluster:
        add(
            "Ray backend: the bench's cluster, start → nodes up",
            f"{_num(cluster.get('start_s'), 2)} s",
            f"{cluster.get('nodes')} nodes on {cluster.get('node_ip')} (head without CPUs)",
        )
        add(
            "Ray backend: `dcf gateway start --backend ray` → /healthz",
            f"{_num(rb.get('gateway_start_s'), 2)} s",
            "joins the cluster as a driver",
        )
        for what, create in (
            ("echo", get(rb, "echo", "create_s")),
            ("SSD", get(rb, "ssd", "create_s")),
        ):
            if create is not None:
                add(f"Ray backend: create → Ready, {what}", f"{_num(create, 2)} s", "one actor")
        if rb.get("gateway_rss_mb"):
            add(
                "Ray backend: gateway RSS (a Ray driver)",
                f"{_num(rb['gateway_rss_mb'], 1)} MB",
                f"idle, before any function: {_num(rb.get('gateway_rss_idle_mb'), 1)} MB",
            )
            add(
                "Ray backend: the cluster, all processes",
                f"{_num(rb.get('cluster_rss_mb'), 0)} MB",
                "GCS, raylets, agents, the SSD replica's worker",
            )
    if not rows:
        return None
    return _table(["cold start and memory", "measured", "note"], rows)


# -- the dcf command ---------------------------------------------------------------------------


def cli_table(results: dict) -> str | None:
    cli = results.get("cli") or {}
    rows = cli.get("rows") or {}
    if not rows:
        return None
    return _table(
        ["command (whole process, echo function)", "median", "best"],
        [
            [name, f"{_ms(r['median_s'] * 1000)} ms", f"{_ms(r['best_s'] * 1000)} ms"]
            for name, r in rows.items()
        ],
    )


def streaming_table(results: dict) -> str | None:
    """Streamed answers: time to first item and items/s, DCF beside a bare Starlette stream."""
    st = results.get("streaming") or {}
    if not st or "skipped" in st:
        return None
    bare = st.get("bare") or {}
    rows = []
    for key in ("gateway-sync", "gateway-async", "bare"):
        r = st.get(key) or {}
        if not r:
            continue
        small = get(r, "small", "items_per_s")
        rows.append(
            [
                key,
                f"{_ms(get(r, 'ttfi', 'p50_ms'))} / {_ms(get(r, 'ttfi', 'p99_ms'))} ms",
                f"{_ms(get(r, 'ttfi_over_own_ms'))} ms",
                _num(small),
                _x(_ratio(small, get(bare, "small", "items_per_s"))),
                _num(get(r, "sse", "items_per_s")),
                _num(get(r, "big", "mb_per_s"), 1),
            ]
        )
    plain = get(st, "gateway-plain", "ttfi")
    if plain:
        rows.append(
            [
                "gateway, one whole answer (floor)",
                f"{_ms(plain.get('p50_ms'))} / {_ms(plain.get('p99_ms'))} ms",
                "",
                "",
                "",
                "",
                "",
            ]
        )
    return _table(
        [
            "streamed answer",
            "TTFI p50 / p99",
            "TTFI after 5 ms of work − 5 ms",
            "items/s (16 B)",
            "vs bare",
            "items/s SSE",
            "MB/s (64 KiB items)",
        ],
        rows,
    )


# -- targets -----------------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """Each target with its measured ratio or value, all from this run."""
    out: list[dict] = []
    echo = results.get("echo") or {}
    ssd = results.get("ssd") or {}
    cold = results.get("coldstart") or {}
    mem = results.get("memory") or {}
    ray = results.get("ray") or {}

    def add(
        name: str,
        value: float | None,
        shown: str,
        target: str,
        ok: Callable[[float], bool] | None,
        shortfall: Callable[[float], str] | None = None,
        note: str = "",
        behind: bool = False,
    ) -> None:
        if value is None:
            return
        status = "info"
        if ok is not None:
            met = ok(value)
            missed = "BEHIND" if behind else "MISSED"
            status = "MET" if met else missed + (f" by {shortfall(value)}" if shortfall else "")
        out.append(
            {
                "target": name,
                "value": value,
                "measured": shown,
                "goal": target,
                "status": status,
                "note": note,
            }
        )

    # echo throughput and latency
    gw8, bare8 = get(echo, "gateway", "c8", "rps"), get(echo, "bare", "c8", "rps")
    r = _ratio(gw8, bare8)
    add(
        "echo: gateway / bare hop, req/s @8",
        r,
        f"{_pct(r)} ({_num(gw8)} / {_num(bare8)})",
        "≥ 35% (aim 50%)",
        lambda v: v >= 0.35,
        lambda v: f"{100 * (0.35 - v):.0f} points",
        "" if r is None or r >= 0.5 else "below the 50% aim",
    )
    rep8 = get(echo, "replica-http", "c8", "rps")
    r = _ratio(gw8, rep8)
    add(
        "echo: gateway / replica alone (HTTP), req/s @8",
        r,
        f"{_pct(r)} ({_num(gw8)} / {_num(rep8)})",
        "(info)",
        None,
    )
    gwp, rep = get(echo, "gateway", "c1", "p50_ms"), get(echo, "replica-http", "c1", "p50_ms")
    if gwp is not None and rep is not None:
        add(
            "echo: added p50 @1, gateway − replica alone (HTTP, wrk)",
            gwp - rep,
            f"{gwp - rep:.3f} ms ({gwp:.3f} − {rep:.3f})",
            "< 0.5 ms (budget 1 ms)",
            lambda v: v < 0.5,
            lambda v: f"{v - 0.5:.3f} ms",
        )
    gwp, fr = (
        get(echo, "gateway-pygen", "c1", "p50_ms"),
        get(echo, "replica-framed", "c1", "p50_ms"),
    )
    if gwp is not None and fr is not None:
        add(
            "echo: added p50 @1, gateway − replica's framed socket (asyncio gen)",
            gwp - fr,
            f"{gwp - fr:.3f} ms ({gwp:.3f} − {fr:.3f})",
            "< 0.5 ms (budget 1 ms)",
            lambda v: v < 0.5,
            lambda v: f"{v - 0.5:.3f} ms",
        )

    # SSD
    pairs = (
        (
            "SSD @8: gateway unbatched / in-process unbatched",
            ("gateway", "c8"),
            ("in-process", "c8"),
        ),
        (
            "SSD @8: gateway @dcf.batch / in-process batches of 8",
            ("gateway-batch", "c8"),
            ("in-process", "batch_c8"),
        ),
    )
    for name, a, b in pairs:
        va, vb = get(ssd, *a, "rps"), get(ssd, *b, "rps")
        r = _ratio(va, vb)
        add(
            name,
            r,
            f"{_pct(r)} ({_num(va, 1)} / {_num(vb, 1)} img/s)",
            "≥ 90%",
            lambda v: v >= 0.9,
            lambda v: f"{100 * (0.9 - v):.0f} points",
        )
    va, vb = get(ssd, "gateway", "c1", "rps"), get(ssd, "in-process", "c1", "rps")
    r = _ratio(va, vb)
    add(
        "SSD @1: gateway / in-process",
        r,
        f"{_pct(r)} ({_num(va, 1)} / {_num(vb, 1)} img/s)",
        "(info)",
        None,
    )
    va, vb = get(ssd, "gateway-batch", "c8", "rps"), get(ssd, "in-process", "c8", "rps")
    r = _ratio(va, vb)
    add(
        "SSD @8: gateway @dcf.batch / in-process unbatched",
        r,
        f"{_pct(r)}",
        "(info: what batching buys)",
        None,
    )

    # Ray, row by row
    ray_rows = [
        (
            "echo p50 @1 (lower is better)",
            ("echo", "c1", "p50_ms"),
            ("echo", "gateway", "c1", "p50_ms"),
            True,
        ),
        ("echo req/s @8", ("echo", "c8", "rps"), ("echo", "gateway", "c8", "rps"), False),
        ("echo req/s @64", ("echo", "c64", "rps"), ("echo", "gateway", "c64", "rps"), False),
        (
            "echo 600 KB req/s @8",
            ("echo", "big_c8", "rps"),
            ("echo", "gateway", "big_c8", "rps"),
            False,
        ),
        ("SSD unbatched img/s @1", ("ssd", "c1", "rps"), ("ssd", "gateway", "c1", "rps"), False),
        ("SSD unbatched img/s @8", ("ssd", "c8", "rps"), ("ssd", "gateway", "c8", "rps"), False),
        (
            "SSD batched img/s @1",
            ("ssd-batch", "c1", "rps"),
            ("ssd", "gateway-batch", "c1", "rps"),
            False,
        ),
        (
            "SSD batched img/s @8",
            ("ssd-batch", "c8", "rps"),
            ("ssd", "gateway-batch", "c8", "rps"),
            False,
        ),
    ]
    for mode, label, goal, need in (
        ("proxy", "Ray proxy", "> 1× (ahead)", 1.0),
        ("direct", "Ray direct", "> 1× (ideally ≥ 1.5×)", 1.0),
    ):
        if not get(ray, mode, "info"):
            continue
        for row, ray_path, dcf_path, lower_better in ray_rows:
            rv = get(ray, mode, *ray_path)
            dv = get(results, *dcf_path)
            factor = _ratio(rv, dv) if lower_better else _ratio(dv, rv)
            note = ""
            if mode == "direct" and factor is not None and factor < 1.5:
                note = "below the 1.5× ideal"
            add(
                f"DCF vs {label}: {row}",
                factor,
                f"{_x(factor)} (DCF {_fmt(dv)} vs Ray {_fmt(rv)})",
                goal,
                lambda v, need=need: v > need,
                None,
                note,
                behind=True,
            )
        if mode == "direct":
            # Like for like: one hop each (DCF's replica run alone vs Ray's replica port).
            for row, ray_path, dcf_path, lower_better in (
                ("echo p50 @1", ("echo", "c1", "p50_ms"), ("c1", "p50_ms"), True),
                ("echo req/s @8", ("echo", "c8", "rps"), ("c8", "rps"), False),
                ("echo 600 KB req/s @8", ("echo", "big_c8", "rps"), ("big_c8", "rps"), False),
            ):
                rv = get(ray, mode, *ray_path)
                dv = get(echo, "replica-http", *dcf_path)
                factor = _ratio(rv, dv) if lower_better else _ratio(dv, rv)
                add(
                    f"DCF replica alone vs Ray direct, one hop each: {row}",
                    factor,
                    f"{_x(factor)} (DCF {_fmt(dv)} vs Ray {_fmt(rv)})",
                    "(info)",
                    None,
                )
        start = get(ray, mode, "info", "start_to_first_answer_s")
        create = cold.get("create_ready_median_s")
        factor = _ratio(start, create)
        add(
            f"DCF vs {label}: create → first answer (Ray: nothing → first answer)",
            factor,
            f"{_x(factor)} (DCF {_fmt(create)} s vs Ray {_fmt(start)} s)",
            "> 1× (ahead)",
            lambda v: v > 1,
            None,
            "DCF's gateway is already running; Ray includes starting the cluster",
            behind=True,
        )

    _ray_backend_targets(results, add)
    from bench import isolation

    isolation.targets(results, add)

    # cold start
    create = cold.get("create_ready_median_s")
    add(
        "create → Ready, cached env (echo)",
        create,
        f"{_num(create, 2)} s",
        "< 3 s",
        lambda v: v < 3,
        lambda v: f"{v - 3:.2f} s",
    )
    zero = get(cold, "from_zero_echo", "median_s")
    add(
        "scale-from-zero → first answer (echo, no model)",
        zero,
        f"{_num(zero, 3)} s",
        "< 1 s + model load",
        lambda v: v < 1,
        lambda v: f"{v - 1:.2f} s",
    )
    zs = get(cold, "from_zero_ssd", "median_s")
    if zs is not None:
        load = (cold.get("ssd_model_load_s") or 0) + (cold.get("ssd_import_s") or 0)
        add(
            "scale-from-zero → first answer (SSD) − model import+load",
            zs - load,
            f"{zs - load:.3f} s ({zs:.3f} − {load:.3f})",
            "< 1 s",
            lambda v: v < 1,
            lambda v: f"{v - 1:.2f} s",
        )
    sc = cold.get("ssd_create_ready_s")
    if sc is not None:
        load = (cold.get("ssd_model_load_s") or 0) + (cold.get("ssd_import_s") or 0)
        add(
            "create → Ready (SSD) − model import+load",
            sc - load,
            f"{sc - load:.2f} s ({sc:.2f} − {load:.2f})",
            "< 3 s",
            lambda v: v < 3,
            lambda v: f"{v - 3:.2f} s",
        )

    # the dcf command
    call = get(results, "cli", "rows", "dcf function call", "median_s")
    curl = get(results, "cli", "rows", "curl", "median_s")
    add(
        "`dcf function call` of an echo function, wall time (median)",
        call,
        f"{_num(call, 3)} s" + (f" (curl {_num(curl, 3)} s)" if curl is not None else ""),
        "≤ 0.15 s",
        lambda v: v <= 0.15,
        lambda v: f"{v - 0.15:.3f} s",
    )

    # streamed answers: the handler yields at once, so all of the TTFI is over its own time
    for kind in ("sync", "async"):
        over = get(results, "streaming", f"gateway-{kind}", "ttfi", "p50_ms")
        bare = get(results, "streaming", "bare", "ttfi", "p50_ms")
        add(
            f"time to first streamed item over the handler's own (p50, {kind} generator)",
            over,
            f"{_num(over, 3)} ms" + (f" (bare Starlette {_num(bare, 3)} ms)" if bare else ""),
            "≤ 2 ms",
            lambda v: v <= 2,
            lambda v: f"{v - 2:.3f} ms",
        )

    # memory
    rss = max(
        (v for v in (mem.get("rss_10_functions_mb"), mem.get("rss_after_calls_mb")) if v),
        default=None,
    )
    add(
        "gateway RSS with 10 functions",
        rss,
        f"{_num(rss, 1)} MB",
        "< 100 MB",
        lambda v: v < 100,
        lambda v: f"{v - 100:.1f} MB",
    )
    from bench import bigbody, oip  # parts with their own rows

    out += oip.targets(results)
    out += bigbody.targets(results)
    if results.get("peers"):
        from bench import peers

        out += peers.targets(results)
    if results.get("tracing"):
        from bench import tracing

        out += tracing.targets(results["tracing"])
    return out


def _ray_backend_targets(results: dict, add: Callable[..., None]) -> None:
    """DCF's Ray backend against the local backend (measured in turns with it) and Ray Serve's
    direct mode, same run."""
    rb = get(results, "raybackend", "echo")
    if not rb:
        return
    local = get(results, "raybackend", "local-echo") or {}
    direct = get(results, "ray", "direct", "echo") or {}
    # (row, path, lower is better, goal against local, goal against Ray direct)
    rows = (
        ("echo p50 @1", ("c1", "p50_ms"), True, None, None),
        ("echo req/s @8", ("c8", "rps"), False, 0.8, 2.0),
        ("echo req/s @64", ("c64", "rps"), False, None, None),
        ("echo 600 KB req/s @8", ("big_c8", "rps"), False, None, None),
    )
    for row, path, lower_better, goal, _ in rows:
        rv, lv = get(rb, *path), get(local, *path)
        if lower_better:
            if rv is not None and lv is not None:
                add(
                    f"Ray backend − local backend: {row}",
                    rv - lv,
                    f"{rv - lv:+.3f} ms ({rv:.3f} − {lv:.3f})",
                    "(info)",
                    None,
                )
            continue
        r = _ratio(rv, lv)
        add(
            f"Ray backend / local backend: {row}",
            r,
            f"{_pct(r)} ({_num(rv)} / {_num(lv)})",
            "(info)" if goal is None else f"≥ {100 * goal:.0f}%",
            None if goal is None else (lambda v, g=goal: v >= g),
            None if goal is None else (lambda v, g=goal: f"{100 * (g - v):.0f} points"),
        )
    for row, path, lower_better, _, goal in rows:
        rv, dv = get(rb, *path), get(direct, *path)
        factor = _ratio(dv, rv) if lower_better else _ratio(rv, dv)
        add(
            f"DCF Ray backend vs Ray Serve direct: {row}"
            + (" (lower is better)" if lower_better else ""),
            factor,
            f"{_x(factor)} (DCF {_fmt(rv)} vs Ray {_fmt(dv)})",
            "(info)" if goal is None else f"≥ {goal:g}×",
            None if goal is None else (lambda v, g=goal: v >= g),
            None,
            behind=True,
        )
    rv = get(results, "raybackend", "ssd", "c8", "rps")
    lv = get(results, "raybackend", "local-ssd", "c8", "rps")
    r = _ratio(rv, lv)
    add(
        "Ray backend / local backend: SSD img/s @8 (example as shipped)",
        r,
        f"{_pct(r)} ({_num(rv, 1)} / {_num(lv, 1)} img/s)",
        "(info)",
        None,
    )
    rb_all = results.get("raybackend") or {}
    same = get(rb_all, "ssd", "same_answer_as_local")
    if same is not None:
        add(
            "Ray backend: ssd-test answers as the local backend does (same boxes)",
            float(same),
            "yes" if same else "no",
            "yes",
            lambda v: v == 1,
        )
    if "non_loopback_connections" in rb_all:
        off = rb_all["non_loopback_connections"]
        add(
            "Ray backend: connections of the gateway and cluster off loopback",
            len(off),
            str(len(off)),
            "none",
            lambda v: v == 0,
            None,
            "; ".join(off[:3]),
        )
    if "left_running" in rb_all:
        left = rb_all["left_running"]
        add(
            "Ray backend: cluster processes left after its shutdown",
            len(left),
            str(len(left)),
            "none",
            lambda v: v == 0,
            None,
            f"pids {left} (killed)" if left else "",
        )


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value < 10:
        return f"{value:.3f}"
    return _num(value, 1 if value < 100 else 0)


def targets_table(rows: list[dict]) -> str:
    return _table(
        ["target (ratios from this run)", "measured", "goal", "status", "note"],
        [[r["target"], r["measured"], r["goal"], r["status"], r.get("note", "")] for r in rows],
    )


def _first(results: dict, *paths: tuple[str, ...]) -> Any:
    """The value at the first of ``paths`` that has one."""
    return next((v for p in paths if (v := get(results, *p)) is not None), None)


def render(results: dict) -> str:
    meta = results.get("meta", {})
    parts = [f"# DCF bench — {meta.get('name', '')}", ""]
    parts.append(
        f"{meta.get('when', '')} · {meta.get('cpu', '')} × {meta.get('cores', '?')} · "
        f"Python {meta.get('python', '')} · dcf {meta.get('git', '')} · "
        f"load generator: {meta.get('generator', '')} · {meta.get('cpus', '')} · "
        f"load average before {meta.get('loadavg_before')} after {meta.get('loadavg_after')}"
    )
    echo = results.get("echo") or {}
    if echo and "skipped" in echo:
        parts += ["", f"## Echo — skipped: {echo['skipped']}"]
    elif _echo_rows(results):
        cpus = echo.get("cpus") or meta.get("cpus")
        repeats = _first(
            results, ("echo", "repeats"), ("ray", "repeats"), ("raybackend", "repeats")
        )
        duration = _first(
            results, ("echo", "duration_s"), ("ray", "duration_s"), ("raybackend", "duration_s")
        )
        parts += [
            "",
            f"## Echo — {cpus}; best of {repeats} interleaved runs of {duration} s per cell",
            "",
            echo_table(results),
        ]
        unpinned = unpinned_table(results)
        if unpinned:
            parts += ["", unpinned]
    ssd = ssd_table(results)
    if ssd:
        s = results.get("ssd") or {
            "cpus": "not pinned",
            "duration_s": _first(results, ("ray", "ssd_s"), ("raybackend", "ssd", "duration_s")),
            "samples": get(results, "raybackend", "ssd", "samples"),
        }
        parts += [
            "",
            f"## SSD — {s.get('cpus')}; {s.get('duration_s')} s per cell; "
            f"samples {s.get('samples')}",
            "",
            ssd,
        ]
    elif get(results, "ssd", "skipped"):
        parts += ["", f"## SSD — skipped: {results['ssd']['skipped']}"]
    life = lifecycle_table(results)
    if life:
        parts += ["", "## Cold start and memory", "", life]
    from bench import isolation

    iso = isolation.table(results)
    if iso:
        reps = get(results, "isolation", "repeats")
        parts += ["", f"## Isolation: sandbox vs process — best of {reps} runs per cell", "", iso]
    elif get(results, "isolation", "skipped"):
        parts += ["", f"## Isolation — skipped: {results['isolation']['skipped']}"]
    cli = cli_table(results)
    if cli:
        runs = get(results, "cli", "runs")
        parts += ["", f"## The dcf command — {runs} runs each, taking turns", "", cli]
    elif get(results, "cli", "skipped"):
        parts += ["", f"## The dcf command — skipped: {results['cli']['skipped']}"]
    stream = streaming_table(results)
    if stream:
        st = results["streaming"]
        parts += [
            "",
            f"## Streamed answers — {st.get('cpus')}; {st.get('calls')} calls per TTFI, best of"
            f" {st.get('rounds')} per rate",
            "",
            stream,
        ]
    elif get(results, "streaming", "skipped"):
        parts += ["", f"## Streamed answers — skipped: {results['streaming']['skipped']}"]
    ray = results.get("ray") or {}
    if get(ray, "skipped"):
        parts += ["", f"## Ray Serve — skipped: {ray['skipped']}"]
    elif ray:
        for mode in ("proxy", "direct"):
            if get(ray, mode, "skipped"):
                parts += ["", f"Ray Serve ({mode}) — {ray[mode]['skipped']}"]
        parts += ["", f"Ray Serve max_ongoing_requests: {ray.get('max_ongoing_requests')}"]
    if get(results, "raybackend", "skipped"):
        parts += ["", f"## DCF's Ray backend — skipped: {results['raybackend']['skipped']}"]
    elif get(results, "raybackend", "ssd", "skipped"):
        why = results["raybackend"]["ssd"]["skipped"]
        parts += ["", f"DCF's Ray backend, SSD — skipped: {why}"]
    from bench import bigbody, oip

    big = bigbody.table(results)
    if big:
        parts += ["", big]
    if results.get("peers"):
        from bench import peers

        parts += ["", peers.table(results)]
    v2 = oip.section(results)
    if v2:
        parts += ["", v2]
    if results.get("tracing"):
        from bench import tracing

        parts += ["", tracing.table(results["tracing"])]
    prof = results.get("profile") or {}
    if prof:
        parts += ["", profile_text(prof)]
    rows = results.get("targets") or []
    if rows:
        parts += ["", "## Targets", "", targets_table(rows)]
    return "\n".join(parts) + "\n"


def profile_text(prof: dict) -> str:
    if "skipped" in prof:
        return f"## Profile — skipped: {prof['skipped']}"
    lines = []
    for scenario, data in prof.items():
        if not isinstance(data, dict) or "load" not in data:
            continue
        lines += [
            "",
            f"## Profile — py-spy, {scenario} for {data.get('duration_s')} s "
            f"({_num(get(data, 'load', 'rps'))} req/s while sampled; {prof.get('cpus')})",
        ]
        for proc in ("gateway", "replica"):
            d = data.get(proc)
            if not d:
                continue
            lines += ["", f"{proc}: {d['samples']} samples on CPU; raw stacks in {d['raw']}", ""]
            rows = [[e["function"], f"{e['pct']:.1f}%"] for e in d["innermost_dcf_frame"][:10]]
            lines.append(_table([f"{proc}: innermost DCF frame of each sample", "%"], rows))
            lines.append("")
            rows = [[e["function"], f"{e['pct']:.1f}%"] for e in d["self"][:12]]
            lines.append(_table([f"{proc}: self time (leaf Python frame)", "%"], rows))
    return "\n".join(lines).lstrip("\n")
