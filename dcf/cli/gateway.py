"""``dcf gateway start``: the one command that loads the gateway (FastAPI), and only
when it runs, so that no other command pays for it at start-up."""

from __future__ import annotations

import os
from pathlib import Path

import click


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
    "--ray-address",
    default="auto",
    show_default=True,
    help="Ray cluster to join with --backend ray: HOST:PORT, or auto (the one on this host).",
)
@click.option(
    "--ray-namespace", default="dcf", show_default=True, help="Ray namespace of the replicas."
)
@click.option("--token", envvar="DCF_TOKEN", help="Require this bearer token for /system calls.")
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
def start(
    host: str,
    port: int,
    backend: str,
    ray_address: str,
    ray_namespace: str,
    token: str | None,
    home: str,
    max_body: int | None,
) -> None:
    """Start the gateway in the foreground."""
    import uvicorn

    from dcf.gateway.app import DEFAULT_MAX_BODY, Settings, create_app

    os.environ.pop("DCF_TOKEN", None)  # replicas must not see it
    try:
        settings = Settings(
            home=Path(home),
            backend=backend,
            token=token,
            max_body=DEFAULT_MAX_BODY if max_body is None else max_body,
            ray_address=ray_address,
            ray_namespace=ray_namespace,
        )
        app = create_app(settings)
    except ValueError as exc:  # a backend that cannot start here: say why in one line
        raise click.ClickException(str(exc)) from None
    click.echo(f"DCF gateway on http://{host}:{port} (backend {backend}, state in {home})")
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
