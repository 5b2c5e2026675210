"""``dcf``: runtime, function and gateway commands."""

from __future__ import annotations

import sys

import click

from dcf import __version__
from dcf.cli.function import function
from dcf.cli.gateway import gateway
from dcf.cli.job import job
from dcf.cli.options import client_for, gateway_option
from dcf.client import GatewayError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcf")
def cli() -> None:
    """Deploy deep-learning models as serverless functions."""


@cli.group()
def runtime() -> None:
    """Runtimes a function can use."""


@runtime.command("list")
@gateway_option
def runtime_list(gateway: str | None, token: str | None) -> None:
    """List the runtimes the gateway offers."""
    with client_for(gateway, token) as client:
        for item in client.runtimes():
            click.echo(f"{item['name']:<10} {item['description']}")


cli.add_command(function)
cli.add_command(gateway)
cli.add_command(job)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except GatewayError as exc:  # pragma: no cover - commands handle their own
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
