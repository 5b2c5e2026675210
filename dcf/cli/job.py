"""``dcf job get ID [--wait]``: a job's answer, or its state while it runs."""

from __future__ import annotations

import click

from dcf.cli.options import client_for, gateway_option, write_answer


@click.group()
def job() -> None:
    """Jobs submitted with dcf function call --async."""


@job.command()
@click.argument("job_id", metavar="ID")
@click.option("--wait", is_flag=True, help="Poll until the job is done, then print its answer.")
@click.option(
    "--timeout", type=float, default=None, help="With --wait: give up after this many seconds."
)
@gateway_option
def get(
    job_id: str, wait: bool, timeout: float | None, gateway: str | None, token: str | None
) -> None:
    """Print the job's answer (as call does), or its state while it is queued or running."""
    with client_for(gateway, token) as client:
        response = client.wait_job(job_id, timeout) if wait else client.job(job_id)
    state = response.headers.get("x-dcf-job-status")
    if state in ("queued", "running"):
        click.echo(state)
        return
    write_answer(response.content)
