"""``dcf function versions|rollback|rollout|promote|abort``: kept versions and canaries.

Thin like every command: the gateway keeps the versions and judges the rollouts
(``/system/function/NAME/versions``, ``/rollback``, ``/rollout``); this only prints.
"""

from __future__ import annotations

import time

import click

from dcf.cli.options import client_for, fail, gateway_option, print_table


def parse_canary(value: str | None) -> int | None:
    """``10%`` or ``10`` → 10; anything else is a usage error naming the value."""
    if value is None:
        return None
    text = value.strip().removesuffix("%").strip()
    if not text.isdigit() or not 1 <= int(text) <= 99:
        raise click.BadParameter(f"{value!r}: give a percentage of calls from 1% to 99%")
    return int(text)


@click.command()
@click.argument("name")
@gateway_option
def versions(name: str, gateway: str | None, token: str | None) -> None:
    """NAME's kept versions: when, the digest of the code, serving, share of calls."""
    with client_for(gateway, token) as client:
        items = client.versions(name)
    rows = [("Version", "Created", "Code", "Serving", "Share")]
    for v in items:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created_at"]))
        serving = v["role"] if v["serving"] else "-"
        rows.append((str(v["version"]), created, v["code_hash"], serving, f"{v['share']}%"))
    print_table(rows)


@click.command()
@click.argument("name")
@click.option("--to", "to", type=int, help="The kept version to serve (else the newest older).")
@gateway_option
def rollback(name: str, to: int | None, gateway: str | None, token: str | None) -> None:
    """Serve an older kept version of NAME again: nothing rebuilt, no call dropped."""
    started = time.monotonic()
    with client_for(gateway, token) as client:
        data = client.rollback(name, to)
    click.echo(
        f"{name}: version {data['version']} serves ({data['status']},"
        f" {time.monotonic() - started:.1f}s, nothing rebuilt)"
    )


def print_rollout(name: str, data: dict) -> None:
    """A rollout as ``dcf function rollout`` shows it."""
    state = data.get("state", "none")
    if state == "none":
        click.echo(f"{name}: no rollout")
        return
    if state != "running":
        click.echo(f"{name}: {data['reason']}")
        shown = data["canary"] if state == "promoted" else data["stable"]
        click.echo(f"  all calls on v{shown}")
        if data.get("figures"):
            click.echo(f"  judged on: {_judged(data['figures'])}")
        return
    plan = data["plan"]
    steps = " → ".join(
        f"[{s}%]" if i == data["step"] else f"{s}%" for i, s in enumerate(data["steps"])
    )
    click.echo(
        f"{name}: canary v{data['canary']} at {data['share']}% of calls, stable"
        f" v{data['stable']} at {100 - data['share']}%"
    )
    click.echo(f"  steps {steps}, every {plan['interval']:g}s (this one for {data['step_age']:g}s)")
    click.echo(
        f"  aborts if error rate > stable + {plan['max_error_rate']:g} or p95 >"
        f" {plan['max_p95_ratio']:g}x stable, judged after {plan['min_calls']} canary calls"
    )
    window = data["window"]
    click.echo(
        "  this window: "
        + "; ".join(f"{role} {_window(window[role])}" for role in ("canary", "stable"))
    )


def _window(w: dict) -> str:
    p95 = "-" if w["p95"] is None else f"{w['p95'] * 1000:.1f}ms"
    return f"{w['calls']} calls, {w['errors']} errors, p95 {p95}"


def _judged(f: dict) -> str:
    text = f"{f['calls']} canary calls, error rate {f['error_rate']:.2f}"
    text += f" vs {f['stable_error_rate']:.2f}"
    if f.get("p95") is not None and f.get("stable_p95") is not None:
        text += f", p95 {f['p95'] * 1000:.1f}ms vs {f['stable_p95'] * 1000:.1f}ms"
    return text


@click.command()
@click.argument("name")
@click.argument("decision", required=False, type=click.Choice(["promote", "abort"]))
@gateway_option
def rollout(name: str, decision: str | None, gateway: str | None, token: str | None) -> None:
    """NAME's canary rollout: its step, shares and figures; or promote/abort it by hand."""
    with client_for(gateway, token) as client:
        data = client.rollout(name, decision)
    print_rollout(name, data)


def _decide(decision: str):  # noqa: ANN202
    @click.argument("name")
    @gateway_option
    def command(name: str, gateway: str | None, token: str | None) -> None:
        with client_for(gateway, token) as client:
            data = client.rollout(name, decision)
        print_rollout(name, data)

    return command


promote = click.command("promote", help="Promote NAME's canary now: it takes every call.")(
    _decide("promote")
)
abort = click.command("abort", help="Abort NAME's rollout now: every call back on stable.")(
    _decide("abort")
)
COMMANDS = [versions, rollback, rollout, promote, abort]


def check_canary(canary: int | None, update: bool) -> None:
    if canary is not None and not update:
        fail("--canary rolls out an update: give --update too")
