"""The environment function code runs in: its own ``environment``, plus what running needs.

Replicas and build steps run code the gateway did not write. They must not
inherit the gateway's environment, which holds whatever its operator's shell
held (cloud credentials, tokens, the admin token itself when it came from
``$DCF_TOKEN``). So they start from nothing and get back only the variables a
process needs to run at all, listed here, then the function's ``environment``
(which the function's author chose), then what the backend adds (socket,
status pipe, GPUs). A function that needs anything else sets it in its
``environment``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Where things are and how text looks: a process can hardly run without these.
BASICS = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    # Finding shared libraries (CUDA, MKL) and reaching the network as this host does.
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
# The interpreter's own settings (PYTHONPATH, a source checkout's), and the locale.
PREFIXES = ("PYTHON", "LC_")


def clean_environment(
    function_env: Mapping[str, str], source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The basics of ``source`` (the gateway's environment), then the function's own."""
    source = os.environ if source is None else source
    env = {key: value for key, value in source.items() if key in BASICS or key.startswith(PREFIXES)}
    env.setdefault("PATH", os.defpath)
    env.setdefault("HOME", os.path.expanduser("~"))
    env.update(function_env)
    return env
