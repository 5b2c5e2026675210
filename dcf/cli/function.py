"""``dcf function ...``: the seed's workflow, command for command.

yaml and dcf.config (pydantic) are imported by the commands that read
config.yaml only: ``dcf function call`` must answer at once.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import click

from dcf.cli.keys import keys
from dcf.cli.options import client_for, fail, gateway_option, print_table, write_chunks
from dcf.cli.versions import COMMANDS as VERSION_COMMANDS
from dcf.cli.versions import check_canary, parse_canary

TEMPLATES = Path(__file__).parent / "templates"


def config_option(help: str):  # noqa: A002, ANN201 - click's own word
    return click.option(
        "-f", "--yaml", "config", default="config.yaml", show_default=True, help=help
    )


@click.group()
def function() -> None:
    """Create, call and manage functions."""


function.add_command(keys)
for _command in VERSION_COMMANDS:
    function.add_command(_command)


@function.command()
@click.option("--runtime", default="python3", show_default=True, help="Runtime of the function.")
@config_option("config.yaml to add the function to.")
@click.argument("name")
def init(runtime: str, config: str, name: str) -> None:
    """Scaffold NAME/ (handler.py, requirements.txt, Dockerfile) and add it to config.yaml."""
    from dcf.config import NAME, RUNTIMES

    if runtime not in RUNTIMES:
        fail(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
    if not NAME.match(name):
        fail(f"{name!r} is not a valid function name: use lowercase letters, digits and '-'")
    config_path = Path(config)
    existing = _existing_functions(config_path)
    if name in existing:
        fail(f"function {name!r} is already in {config_path}; choose another name")
    target = Path(name)
    if target.exists():
        fail(f"{target}/ already exists; choose another name or remove it")
    target.mkdir(parents=True)
    for template in ("handler.py", "requirements.txt", "Dockerfile"):
        shutil.copy(TEMPLATES / template, target / template)
    _add_to_config(config_path, name, runtime)
    click.echo(f"Function {name} created in ./{name}/ and added to {config_path}")
    click.echo(f"Edit {name}/handler.py, then: dcf function create -f {config_path}")


def _existing_functions(path: Path) -> dict:
    from dcf import yamlsafe

    if not path.exists():
        return {}
    try:
        data = yamlsafe.load(path) or {}
    except yamlsafe.YamlError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{path}: cannot be read ({exc.strerror or exc})")
    functions = data.get("functions") if isinstance(data, dict) else None
    return functions if isinstance(functions, dict) else {}


def _add_to_config(path: Path, name: str, runtime: str) -> None:
    import yaml

    from dcf import yamlsafe

    block = (
        f"  {name}:\n"
        f"    runtime: {runtime}\n"
        f'    desc: ""\n'
        f'    maintainer: ""\n'
        f"    handler: {{dir: ./{name}, file: handler.py, name: Handler}}\n"
        f"    image: {name}\n"
        f"    replicas: {{min: 1, max: 1}}\n"
        f"    timeout: 30s\n"
    )
    if not path.exists():
        # No dcf.gateway here: it would outrank $DCF_GATEWAY for every command.
        path.write_text(
            "# dcf:\n#   gateway: 127.0.0.1:31113   # else $DCF_GATEWAY, else this default\n"
            f"functions:\n{block}"
        )
        return
    lines = path.read_text().splitlines(keepends=True)
    start = next(
        (i for i, line in enumerate(lines) if re.match(r"functions:\s*(#.*)?$", line)), None
    )
    if start is None:
        # No block-style functions section: add one (a flow-style one is rewritten).
        data = yamlsafe.loads("".join(lines), path) or {}
        if "functions" in data:
            data["functions"][name] = yaml.safe_load(block)[name]
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            return
        text = "".join(lines)
        path.write_text(
            text + ("" if text.endswith("\n") or not text else "\n") + "functions:\n" + block
        )
        return
    # Insert after the last line of the functions section, keeping the user's comments.
    end = len(lines)
    for i in range(start + 1, len(lines)):
        if lines[i].strip() and not lines[i][0].isspace() and not lines[i].startswith("#"):
            end = i
            break
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    if end and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    lines.insert(end, block)
    path.write_text("".join(lines))


@function.command()
@config_option("config.yaml describing the functions.")
@click.option("-v", "--verbose", is_flag=True, help="Stream the build output.")
@click.option("--update", is_flag=True, help="Replace functions that already exist.")
@click.option("--no-wait", is_flag=True, help="Return once accepted, without waiting for Ready.")
@click.option(
    "--canary",
    metavar="PERCENT",
    help="With --update: roll out as a canary from this share of calls (e.g. 10%), judged and"
    " stepped by the gateway (rollout: in config.yaml sets the steps).",
)
@click.argument("names", nargs=-1)
@gateway_option
def create(
    config: str,
    verbose: bool,
    update: bool,
    no_wait: bool,
    canary: str | None,
    names: tuple[str, ...],
    gateway: str | None,
    token: str | None,
) -> None:
    """Deploy the functions of config.yaml (or only NAMES)."""
    from dcf.config import ConfigError, load_project

    percent = parse_canary(canary)
    check_canary(percent, update)
    try:
        project = load_project(config)
    except ConfigError as exc:
        fail(str(exc))
    selected = list(names) or list(project.functions)
    missing = [n for n in selected if n not in project.functions]
    if missing:
        fail(f"{config}: no function named {missing[0]!r} (it has: {', '.join(project.functions)})")
    if not selected:
        fail(f"{config}: defines no functions")
    failed = False
    with client_for(gateway or project.gateway, token) as client:
        for name in selected:
            spec = project.functions[name]
            verb = "Updating" if update else "Deploying"
            click.echo(f"{verb} {name} ...")
            started = time.monotonic()
            on_log = (lambda line, n=name: click.echo(f"  [{n}] {line}")) if verbose else None
            result = client.deploy(
                spec,
                project.handler_dir(name),
                update=update,
                on_log=on_log,
                wait=not no_wait,
                canary=percent,
            )
            status = result.get("status", "Building")
            if status == "Failed" or (result.get("function") or {}).get("last_error"):
                failed = True
                info = result.get("function") or {}
                reason = info.get("last_error") or info.get("failure") or "see dcf function log"
                click.echo(f"{name}: {status}\n{reason}", err=True)
            else:
                click.echo(f"{name}: {status} ({time.monotonic() - started:.1f}s)")
                run = (result.get("function") or {}).get("rollout") or {}
                if run.get("state") == "running":
                    click.echo(
                        f"{name}: canary v{run['canary']} takes {run['share']}% of calls"
                        f" (steps {', '.join(f'{s}%' for s in run['steps'])}); watch it with:"
                        f" dcf function rollout {name}"
                    )
    if failed:
        sys.exit(1)


@function.command("list")
@gateway_option
def list_functions(gateway: str | None, token: str | None) -> None:
    """Functions with their invocations, replicas and status."""
    with client_for(gateway, token) as client:
        items = client.list()
    rows = [("Function", "Runtime/Image", "Maintainer", "Invocations", "Replicas", "Status")]
    for f in items:
        image = f["runtime"] + (f"/{f['image']}" if f.get("image") else "")
        replicas = f"{f['replicas']['ready']}/{f['replicas']['desired']}"
        rows.append(
            (f["name"], image, f["maintainer"] or "-", str(f["invocations"]), replicas, f["status"])
        )
    print_table(rows)


@function.command()
@click.argument("name")
@gateway_option
def info(name: str, gateway: str | None, token: str | None) -> None:
    """Everything about one function, including why it failed."""
    with client_for(gateway, token) as client:
        data = client.info(name)
    r = data["replicas"]
    lat = data["latency"]
    fields = [
        ("Function", data["name"]),
        ("Status", data["status"]),
        ("Version", data["version"]),
        ("Runtime", data["runtime"]),
        ("Image", data["image"] or "-"),
        ("Description", data["desc"] or "-"),
        ("Maintainer", data["maintainer"] or "-"),
        ("Invocations", data["invocations"]),
        ("Errors (5xx)", data["errors"]),
        (
            "Latency p50/p99",
            "/".join("-" if v is None else f"{v * 1000:.1f}ms" for v in (lat["p50"], lat["p99"])),
        ),
        (
            "Replicas",
            f"{r['ready']} ready, {r['desired']} desired (min {r['min']}, max {r['max']})",
        ),
        ("Restarts", r["restarts"]),
    ]
    if r.get("last_restart"):
        fields.append(("Last restart", r["last_restart"]))
    spec = data.get("spec") or {}
    if spec.get("auth") == "key":
        fields.append(("Auth", "key (callers need one: dcf function keys)"))
    if spec.get("environment"):  # names only: the gateway never shows the values
        fields.append(("Environment", ", ".join(spec["environment"]) + " (values hidden)"))
    for key, value in fields:
        click.echo(f"{key + ':':<17}{value}")
    for rep in r["list"]:
        node = rep.get("node", "local")
        if rep.get("node_ip"):
            node = f"{rep['node_ip']} ({node[:12]})"
        click.echo(
            f"  {rep['id']:<28} {rep['state']:<9} node {node}  pid {rep['pid']}"
            f"  in flight {rep['inflight']}  {rep.get('address') or ''}".rstrip()
        )
        if rep.get("detail"):
            click.echo(f"    {rep['detail']}")
        if rep.get("isolation") == "sandbox":
            limits = ", ".join(f"{k} {v}" for k, v in (rep.get("limits") or {}).items())
            by = f" (by {rep['limits_by']})" if rep.get("limits_by") else ""
            click.echo(f"    sandbox: {limits}{by}")
    run = data.get("rollout") or {}
    if run.get("state") == "running":
        click.echo(
            f"Rollout:         canary v{run['canary']} at {run['share']}% of calls"
            f" (steps {', '.join(f'{s}%' for s in run['steps'])}): dcf function rollout {name}"
        )
    elif run.get("reason"):
        click.echo(f"Rollout:         {run['reason']}")
    if data["failure"]:
        click.echo(f"Failure:\n{data['failure'].rstrip()}")
    if data["last_error"]:
        click.echo(f"Last error:\n{data['last_error'].rstrip()}")


def _call(
    name: str,
    query: tuple[str, ...],
    header: tuple[str, ...],
    is_async: bool,
    key: str | None,
    gateway: str | None,
    token: str | None,
) -> None:
    body = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    params = dict(q.split("=", 1) if "=" in q else (q, "") for q in query)
    malformed = [h for h in header if ":" not in h]
    if malformed:
        fail(f"-H {malformed[0]!r}: write a header as 'Name: value'")
    headers = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in header)}
    with client_for(gateway, token, key=key) as client:
        if is_async:
            click.echo(client.invoke_async(name, body, params, headers))
            return
        with client.invoke_stream(name, body, params, headers) as chunks:
            write_chunks(chunks)  # a streamed answer: each item as it arrives


_call_options = [
    click.argument("name"),
    click.option("-q", "--query", multiple=True, help="Query parameter KEY=VALUE (repeatable)."),
    click.option("-H", "--header", multiple=True, help="Header 'Name: value' (repeatable)."),
    click.option(
        "--async",
        "is_async",
        is_flag=True,
        help="Run it as a job: print the job's id (dcf job get ID [--wait]). "
        "-H 'X-Callback-Url: URL' has the answer POSTed there.",
    ),
    click.option(
        "--key",
        envvar="DCF_KEY",
        help="A key of the function, for functions with auth: key (dcf function keys).",
    ),
    gateway_option,
]


def _with(options: list, fn):  # noqa: ANN001, ANN202
    for option in reversed(options):
        fn = option(fn)
    return fn


function.command("call", help="Call NAME with stdin as the body; print the answer.")(
    _with(_call_options, _call)
)
function.command("invoke", help="Same as call.")(_with(_call_options, _call))


def _log(name: str, follow: bool, tail: int, gateway: str | None, token: str | None) -> None:
    with client_for(gateway, token) as client:
        if not follow:
            click.echo(client.logs(name, tail), nl=False)
            return
        try:
            for line in client.follow_logs(name, tail):
                click.echo(line)
        except KeyboardInterrupt:
            pass


_log_options = [
    click.argument("name"),
    click.option("-f", "--follow", is_flag=True, help="Keep printing new lines."),
    click.option("--tail", default=100, show_default=True, help="Lines of history to show."),
    gateway_option,
]
function.command("log", help="Output of NAME's replicas and its lifecycle events.")(
    _with(_log_options, _log)
)
function.command("logs", help="Same as log.")(_with(_log_options, _log))


@function.command()
@click.argument("name")
@click.option("--min", "min_replicas", type=int, help="Fewest replicas (0: scale to zero).")
@click.option("--max", "max_replicas", type=int, help="Most replicas.")
@gateway_option
def scale(
    name: str,
    min_replicas: int | None,
    max_replicas: int | None,
    gateway: str | None,
    token: str | None,
) -> None:
    """Set NAME's replica bounds while it runs."""
    if min_replicas is None and max_replicas is None:
        fail("give --min, --max or both")
    with client_for(gateway, token) as client:
        data = client.scale(name, min_replicas, max_replicas)
    r = data["replicas"]
    click.echo(f"{name}: min {r['min']}, max {r['max']}, {r['desired']} desired")


@function.command()
@click.argument("names", nargs=-1)
@click.option("-f", "--yaml", "config", help="Delete every function of this config.yaml.")
@gateway_option
def delete(
    names: tuple[str, ...], config: str | None, gateway: str | None, token: str | None
) -> None:
    """Remove functions and stop their replicas."""
    from dcf.config import ConfigError, load_project

    targets = list(names)
    project_gateway = None
    if config:
        try:
            project = load_project(config, check_dirs=False)
        except ConfigError as exc:
            fail(str(exc))
        targets += [n for n in project.functions if n not in targets]
        project_gateway = project.gateway
    if not targets:
        fail("name a function, or give -f config.yaml")
    with client_for(gateway or project_gateway, token) as client:
        for name in targets:
            client.delete(name)
            click.echo(f"Deleted {name}")
