"""Options every command that talks to the gateway shares, and how errors are shown."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from dcf.client import Client, GatewayError


def gateway_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar="DCF_TOKEN", help="Bearer token of the gateway.")(fn)
    return click.option(
        "-g",
        "--gateway",
        help="Gateway address (else dcf.gateway in config.yaml, $DCF_GATEWAY, 127.0.0.1:31113).",
    )(fn)


def gateway_from_config(path: str | Path | None) -> str | None:
    """dcf.gateway of a config.yaml, read leniently: a broken file is reported elsewhere."""
    from dcf import yamlsafe  # small; it imports PyYAML only to parse

    file = Path(path) if path else Path("config.yaml")
    try:
        text = yamlsafe.read_text(file)  # a huge or binary file is passed over, not read
    except (OSError, yamlsafe.YamlError):
        return None
    if "gateway" not in text:  # most calls: no need to load a YAML parser
        return None
    try:
        return str(yamlsafe.loads(text, file)["dcf"]["gateway"])
    except (yamlsafe.YamlError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def client_for(
    gateway: str | None,
    token: str | None,
    config: str | Path | None = None,
    key: str | None = None,
) -> Iterator[Client]:
    """A client, with any gateway error turned into one line on stderr and exit 1."""
    client = Client(gateway or gateway_from_config(config), token, key=key)
    try:
        yield client
    except GatewayError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    finally:
        client.close()


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows (the first one the header) in columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def write_answer(content: bytes) -> None:
    """An answer byte for byte; on a terminal, ended with a newline if it lacks one."""
    sys.stdout.buffer.write(content)
    if content and not content.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def write_chunks(chunks: Iterator[bytes]) -> None:
    """An answer byte for byte as it arrives; on a terminal, ended with a newline if it
    lacks one."""
    last = b""
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()
        last = chunk
    if last and not last.endswith(b"\n") and sys.stdout.isatty():
        out.write(b"\n")
    out.flush()
