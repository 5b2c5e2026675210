"""The flags of ``dcf gateway start`` that set the gateway's limits (dcf.gateway.limits).

``with_limits`` adds them to a command and hands it one ``limits`` argument, so the
command's own signature does not grow a parameter per limit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

# (flag, parameter, kind, default shown, help); kinds: size, count, duration.
FLAGS = [
    ("--max-upload", "max_upload", "size", "64Mi", "Largest code archive a deploy may upload."),
    ("--max-upload-files", "max_upload_files", "count", "10000", "Most files in a code archive."),
    ("--max-unpacked", "max_unpacked", "size", "1Gi", "Most bytes a code archive may unpack to."),
    (
        "--install-timeout",
        "install_timeout",
        "duration",
        "10m",
        "Longest pip may take to install a function's requirements.",
    ),
    (
        "--body-timeout",
        "body_timeout",
        "duration",
        "30s",
        "Longest a client may take to send a request body (408 after).",
    ),
    (
        "--unresponsive-after",
        "unresponsive_after",
        "count",
        "3",
        "Replace a replica after this many calls in a row time out on it, or when one call"
        " stays unanswered this many timeouts past its own (0: never).",
    ),
    (
        "--healthy-after",
        "healthy_after",
        "duration",
        "5s",
        "Serving this long resets a replica's restart backoff.",
    ),
    (
        "--follow-buffer",
        "follow_buffer",
        "size",
        "1Mi",
        "Log lines held for a `logs -f` reader that falls behind (newer ones dropped).",
    ),
    (
        "--keep-versions",
        "keep_versions",
        "count",
        "5",
        "Versions of each function kept for `dcf function rollback` (oldest removed).",
    ),
]


def with_limits(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {param: kwargs.pop(param) for _, param, _, _, _ in FLAGS}
        kwargs["limits"] = _limits(values)
        return command(*args, **kwargs)

    for flag, param, _, default, help_text in reversed(FLAGS):
        wrapper = click.option(flag, param, default=default, show_default=True, help=help_text)(
            wrapper
        )
    return wrapper


def _limits(values: dict[str, str]) -> Any:
    from dcf.config import parse_duration, parse_memory
    from dcf.gateway.limits import Limits

    parsed: dict[str, Any] = {}
    for flag, param, kind, _, _ in FLAGS:
        value = values[param]
        try:
            if kind == "size":
                parsed[param] = parse_memory(value)
            elif kind == "duration":
                parsed[param] = parse_duration(value)
            else:
                parsed[param] = int(value)
                if parsed[param] < 0:
                    raise ValueError("must be 0 or more")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=flag) from None
    if parsed["max_upload_files"] < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--max-upload-files")
    if parsed["keep_versions"] < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--keep-versions")
    return Limits(**parsed)
