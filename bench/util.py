"""Processes, ports, CPU pinning and memory readings shared by every part of the bench.

Every process the bench starts goes through :func:`spawn`, in a session of its
own, and is remembered: :func:`stop_all` (run at exit, on Ctrl-C and on
SIGTERM) ends each one together with every process it started (replicas, Ray's
raylet and workers), so nothing outlives the bench.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_procs: list[subprocess.Popen] = []
_tmpdirs: list[str] = []


# -- CPUs -----------------------------------------------------------------------------------


def all_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


class Cpus:
    """Which cores the servers get and which the load generator gets.

    With two or more cores the servers (gateway, replicas, Ray) run on one core and
    the load generator on another, so a Python generator cannot steal CPU from the
    server it measures and the req/s ratios compare CPU cost per call.
    """

    def __init__(self, pin: bool) -> None:
        cpus = sorted(all_cpus())
        self.all = set(cpus)
        self.pinned = pin and len(cpus) >= 2
        if self.pinned:
            self.server = {cpus[0]}
            self.client = {cpus[1]}
        else:
            self.server = set(cpus)
            self.client = set(cpus)

    def describe(self) -> str:
        if not self.pinned:
            return f"not pinned (all of cores {sorted(self.all)} shared)"
        return (
            f"servers on core {sorted(self.server)}, load generator on core {sorted(self.client)}"
        )


def _preexec(cpus: set[int] | None):  # noqa: ANN202
    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children of children ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        rest = stat[stat.rfind(b")") + 2 :].split()
        ppid = int(rest[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def set_affinity_tree(pid: int, cpus: set[int]) -> None:
    """Move a process, its threads and all its descendants (and theirs) onto ``cpus``."""
    for proc in descendants(pid):
        try:
            tasks = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


# -- memory and CPU time ----------------------------------------------------------------------


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tree_rss_mb(pid: int) -> float:
    return round(sum(rss_mb(p) or 0.0 for p in descendants(pid)), 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    rest = stat[stat.rfind(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


# -- ports and HTTP ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(check, timeout: float, what: str, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Call ``check`` until it returns something truthy; raise naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:g}s" + (f" ({last})" if last else ""))


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    def ok() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        return http("GET", url, timeout=2)[0] < 500

    wait_for(ok, timeout, f"{url} answering")


# -- processes ---------------------------------------------------------------------------------


def tempdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    _tmpdirs.append(path)
    return path


def spawn(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
    log: str | Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    cwd: str | Path | None = None,
    stderr_log: str | Path | None = None,
) -> subprocess.Popen:
    """Start a process in its own session, optionally pinned, remembered for cleanup."""
    full_env = {**os.environ, **(env or {})}
    out = stdout
    if out is None:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    if stderr_log:
        err = open(stderr_log, "ab")  # noqa: SIM115 - closed below
    else:
        err = subprocess.STDOUT if log or stdout is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        list(cmd),
        env=full_env,
        stdin=stdin,
        stdout=out,
        stderr=err,
        preexec_fn=_preexec(cpus),
        start_new_session=True,
        cwd=cwd,
    )
    for handle in (out, err):
        if hasattr(handle, "close"):
            handle.close()
    _procs.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 8.0, sig: int = signal.SIGTERM) -> None:
    """End ``proc`` and everything it started: ``sig`` first, SIGKILL after ``grace``."""
    tree = descendants(proc.pid)[1:] if proc.poll() is None else []  # what it started
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Whatever it started and did not stop (replicas, Ray's processes) goes now; its own pid
    # only while it is not reaped (once reaped, the pid may be another process's).
    for pid in ([proc.pid] if proc.poll() is None else []) + tree:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ValueError):
        _procs.remove(proc)


def kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def stop_all() -> None:
    for proc in list(reversed(_procs)):
        with contextlib.suppress(Exception):
            stop(proc, grace=3.0)
    for path in _tmpdirs:
        shutil.rmtree(path, ignore_errors=True)
    _tmpdirs.clear()


def install_cleanup() -> None:
    atexit.register(stop_all)

    def on_term(signum, _frame) -> None:  # noqa: ANN001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the bench even when it was started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGHUP, on_term)


def read_json_line(
    proc: subprocess.Popen, tag: bytes, timeout: float, what: str, log: Path | None = None
) -> dict:
    """The ``TAG {json}`` line a helper process prints once it is ready (``proc.stdout`` piped).

    Raises with the tail of its log if it exits first."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            code = proc.wait()
            raise RuntimeError(f"{what} exited with {code} before it was ready: {tail}")
        if line.startswith(tag + b" "):
            return json.loads(line[len(tag) + 1 :])
    raise RuntimeError(f"{what} did not become ready in {timeout:g} s")


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot): with its pid, names it unambiguously."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[19])


def still_running(procs: dict[int, int | None]) -> list[int]:
    """Which of ``{pid: start_time}`` are still the same processes, alive (zombies count not)."""
    alive = []
    for pid, started in procs.items():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and start_time(pid) == started:
            alive.append(pid)
    return alive


def non_loopback_connections(pids: Iterable[int]) -> list[str]:
    """Established TCP connections of ``pids`` with an end outside 127.0.0.0/8 and ::1."""
    wanted = set(pids)
    try:
        out = subprocess.run(["ss", "-Htnp"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"ss failed: {exc}"]
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        fields = line.split()
        if not owners & wanted or len(fields) < 5:
            continue
        for end in fields[3:5]:
            host = end.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                found.append(line.strip())
                break
    return found


# -- a shared machine -----------------------------------------------------------------------------


def _busy_and_total() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def machine_busy_pct(interval: float = 1.0) -> float:
    """How busy all cores were over ``interval`` seconds, in % of the machine."""
    busy0, total0 = _busy_and_total()
    time.sleep(interval)
    busy1, total1 = _busy_and_total()
    return 100 * (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(max_wait: float, threshold: float = 25.0, calm: int = 3) -> float | None:
    """Wait (up to ``max_wait`` s) until the machine has been under ``threshold`` % busy for
    ``calm`` seconds in a row: other people's work on a shared machine skews every number.
    Returns the last reading."""
    if max_wait <= 0:
        return None
    deadline = time.monotonic() + max_wait
    quiet = 0
    reading = 100.0
    while time.monotonic() < deadline:
        reading = machine_busy_pct(1.0)
        quiet = quiet + 1 if reading < threshold else 0
        if quiet >= calm:
            return reading
    log(f"machine still {reading:.0f}% busy after waiting {max_wait:g}s for quiet; going on")
    return reading


# -- misc -----------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dumps(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def venvs_root() -> Path:
    """Where the bench keeps its peers' venvs: ``$DCF_BENCH_VENVS``, else a build dir."""
    root = os.environ.get("DCF_BENCH_VENVS")
    if not root:
        root = "/work/venvs" if Path("/work/venvs").is_dir() else str(ROOT / "build" / "venvs")
    return Path(root)


def ensure_venv(venv: Path, requirements: Path, label: str, ready: str = "python") -> Path:
    """A peer's venv, made (or brought up to ``requirements``) when it is not current.

    Peers pin versions that conflict with DCF's, so each gets a venv of its own; a stamp
    of the requirements file's digest says whether it is up to date. ``ready``: the file
    in its ``bin/`` that a finished install has.
    """
    stamp = venv / ".dcf-requirements-sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if (venv / "bin" / ready).exists() and stamp.exists() and stamp.read_text() == digest:
        return venv
    log(f"{label}: installing into {venv} from {requirements.name} (once)")
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-r", str(requirements)], check=True, timeout=1800)
    stamp.write_text(digest)
    return venv


def py_spy(
    pid: int, out: Path, fmt: str, rate: int, duration: float, cpus: Cpus
) -> subprocess.Popen:
    """``py-spy record`` of ``pid`` into ``out``; sampling costs CPU too, so it runs on
    the load generator's core, not the servers'."""
    cmd = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", fmt]
    cmd += ["--duration", str(duration), "--nonblocking", "-o", str(out)]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_preexec(cpus.client if cpus.pinned else None),
    )
