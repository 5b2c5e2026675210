"""``dcf gateway start``: the one command that loads the gateway (FastAPI), and only
when it runs, so that no other command pays for it at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dcf.cli.limit_options import with_limits

if TYPE_CHECKING:
    from dcf.gateway.jobs.api import JobSettings
    from dcf.gateway.limits import Limits
    from dcf.telemetry import TraceSettings


@click.group()
def gateway() -> None:
    """Run the gateway."""


@gateway.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=31113, show_default=True, type=int)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where replicas run.",
)
@click.option(
    "--isolation",
    type=click.Choice(["sandbox", "process"]),
    default="sandbox",
    show_default=True,
    help="Replicas and build steps in a sandbox (bwrap namespaces, cgroup limits), or as"
    " plain processes of this user (process: no isolation, no limits; choose it knowingly).",
)
@click.option(
    "--ray-address",
    default="auto",
    show_default=True,
    help="Ray cluster to join with --backend ray: HOST:PORT, or auto (the one on this host).",
)
@click.option(
    "--ray-namespace", default="dcf", show_default=True, help="Ray namespace of the replicas."
)
@click.option(
    "--token", envvar="DCF_TOKEN", help="Require this bearer token for /system and /metrics."
)
@click.option(
    "--token-fd",
    type=int,
    hidden=True,
    help="Read the token from this pipe (how the gateway hands it to itself: handoff.py).",
)
@click.option(
    "--home",
    envvar="DCF_HOME",
    default=lambda: str(Path.home() / ".dcf"),
    show_default="~/.dcf",
    help="State directory (registry, code, envs, logs).",
)
@click.option(
    "--max-body",
    default=None,
    show_default="32 MiB",
    type=int,
    help="Largest request body in bytes (413 above).",
)
@click.option(
    "--callback-allow",
    default=None,
    show_default="127.0.0.0/8,::1,localhost",
    help="Where X-Callback-Url may point (an SSRF guard): networks (CIDR) and host names.",
)
@click.option("--job-ttl", default="24h", show_default=True, help="How long job results are kept.")
@click.option(
    "--job-result-max",
    default="32Mi",
    show_default=True,
    help="Largest answer kept for a job (larger: the job fails, 507).",
)
@click.option(
    "--job-max", default=10_000, show_default=True, type=int, help="Jobs stored before 429."
)
@click.option(
    "--job-max-bytes",
    default="2Gi",
    show_default=True,
    help="Bytes of job bodies and results on disk before 429.",
)
@click.option(
    "--otlp-endpoint",
    metavar="URL",
    help="Trace every call to this OTLP/HTTP collector (base URL, e.g. http://127.0.0.1:4318;"
    " default: $OTEL_EXPORTER_OTLP_ENDPOINT, unset: no tracing).",
)
@click.option(
    "--trace-sample",
    type=float,
    metavar="RATIO",
    help="Share of new traces kept, 0 to 1 (parentbased_traceidratio; default:"
    " $OTEL_TRACES_SAMPLER / $OTEL_TRACES_SAMPLER_ARG, else every one).",
)
@with_limits
@click.pass_context
def start(
    ctx: click.Context,
    host: str,
    port: int,
    backend: str,
    isolation: str,
    ray_address: str,
    ray_namespace: str,
    token: str | None,
    token_fd: int | None,
    home: str,
    max_body: int | None,
    callback_allow: str | None,
    job_ttl: str,
    job_result_max: str,
    job_max: int,
    job_max_bytes: str,
    otlp_endpoint: str | None,
    trace_sample: float | None,
    limits: Limits,
) -> None:
    """Start the gateway in the foreground."""
    from dcf.cli import handoff

    if token == "":
        raise click.BadParameter("must not be empty", param_hint="--token")
    if token_fd is not None:
        token = handoff.receive(token_fd)
    elif token is not None:  # out of our argv and environ, where replicas could read it
        handoff.reexec_without(ctx, "token", "DCF_TOKEN", "--token-fd")
    import uvicorn

    from dcf import tuning
    from dcf.gateway.app import DEFAULT_MAX_BODY, Settings, create_app

    tuning.tune_malloc()

    jobs = _job_settings(callback_allow, job_ttl, job_result_max, job_max, job_max_bytes, port)
    tracing = _trace_settings(otlp_endpoint, trace_sample)
    os.environ.pop("DCF_TOKEN", None)  # replicas must not see it
    try:
        settings = Settings(
            home=Path(home),
            backend=backend,
            isolation=isolation,
            token=token,
            max_body=DEFAULT_MAX_BODY if max_body is None else max_body,
            ray_address=ray_address,
            ray_namespace=ray_namespace,
            jobs=jobs,
            limits=limits,
            tracing=tracing,
        )
        app = create_app(settings)
    except ValueError as exc:  # a backend that cannot start here: say why in one line
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"DCF gateway on http://{host}:{port} (backend {backend}, isolation {isolation},"
        f" state in {home})"
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        loop="auto",
        http="httptools",
        # Nothing here reads X-Forwarded-*; the layer costs every call a few µs.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


def _trace_settings(endpoint: str | None, sample: float | None) -> TraceSettings | None:
    """Tracing from the flags and the OTEL_ variables, or a one-line usage error."""
    from dcf.telemetry import TracingError, from_environment

    try:
        return from_environment(os.environ, endpoint, sample)
    except TracingError as exc:
        raise click.UsageError(str(exc)) from None


def _job_settings(
    allow: str | None, ttl: str, result_max: str, most: int, max_bytes: str, port: int
) -> JobSettings:
    """The job store's limits from the flags, or a one-line usage error naming the flag."""
    from dcf.config import parse_duration, parse_memory
    from dcf.gateway.jobs.api import JobSettings
    from dcf.gateway.jobs.callbacks import AllowList

    def parse(flag: str, parser, value: str):  # noqa: ANN001, ANN202
        try:
            return parser(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=flag) from None

    entries = JobSettings.callback_allow
    if allow is not None:
        entries = tuple(e.strip() for e in allow.split(",") if e.strip())
        parse("--callback-allow", AllowList, entries)
    if most < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--job-max")
    return JobSettings(
        ttl=parse("--job-ttl", parse_duration, ttl),
        result_max=parse("--job-result-max", parse_memory, result_max),
        max_jobs=most,
        max_bytes=parse("--job-max-bytes", parse_memory, max_bytes),
        callback_allow=entries,
        own_ports=(port,),  # a callback never calls the gateway itself
    )
