"""``dcf function keys NAME create|list|revoke``: the keys of a function with ``auth: key``."""

from __future__ import annotations

import time

import click

from dcf.cli.options import client_for, gateway_option, print_table


@click.group()
@click.argument("name")
@click.pass_context
def keys(ctx: click.Context, name: str) -> None:
    """Keys that callers of NAME present (X-DCF-Key) when it has auth: key."""
    ctx.obj = name


@keys.command()
@click.option("--rate", help="Rate limit of the key: 5/s, 100/m, 1000/h (429 above).")
@gateway_option
@click.pass_obj
def create(name: str, rate: str | None, gateway: str | None, token: str | None) -> None:
    """Make a key; it is printed this once (the gateway keeps only its hash)."""
    with client_for(gateway, token) as client:
        made = client.create_key(name, rate)
    click.echo(f"Id:   {made['id']}")
    click.echo(f"Rate: {made['rate'] or 'unlimited'}")
    click.echo(f"Key:  {made['key']}")
    click.echo("Keep the key now: it is not shown again.", err=True)
    if not made.get("required"):
        click.echo(
            f"note: {name} does not ask for keys yet: set auth: key in its config.yaml", err=True
        )


@keys.command("list")
@gateway_option
@click.pass_obj
def list_keys(name: str, gateway: str | None, token: str | None) -> None:
    """Ids, rate limits and states (never the keys)."""
    with client_for(gateway, token) as client:
        items = client.list_keys(name)
    rows = [("Id", "Rate", "Created", "Status")]
    for key in items:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(key["created_at"]))
        status = "revoked" if key["revoked"] else "active"
        rows.append((key["id"], key["rate"] or "unlimited", created, status))
    print_table(rows)


@keys.command()
@click.argument("key_id")
@gateway_option
@click.pass_obj
def revoke(name: str, key_id: str, gateway: str | None, token: str | None) -> None:
    """Revoke KEY_ID: calls with it get 401 from now on."""
    with client_for(gateway, token) as client:
        client.revoke_key(name, key_id)
    click.echo(f"Revoked {key_id} of {name}")
