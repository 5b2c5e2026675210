"""config.yaml: the functions a user deploys.

Validated with errors that name the file, the function and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcf import yamlsafe
from dcf.oip.types import TensorSpec, unique

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
RUNTIMES = {"python3": "Python 3 (this gateway's interpreter, with the function's requirements)"}
_MEMORY_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


class ConfigError(ValueError):
    """A config.yaml problem; the message names the file, the function and the field."""


def parse_duration(value: Any) -> float:
    """``30s``, ``500ms``, ``2m``, ``1h`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 500ms, 2m)")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
        seconds = float(match.group(1)) * scale
    if seconds <= 0:
        raise ValueError("must be more than zero")
    return seconds


def parse_memory(value: Any) -> int:
    """Kubernetes-style quantities: ``512Mi``, ``1Gi``, ``1G``, or bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not a memory size (use e.g. 512Mi, 2Gi)")
    return int(float(match.group(1)) * _MEMORY_UNITS[(match.group(2) or "").lower()])


def parse_cpu(value: Any) -> float:
    """``"1"``, ``"0.5"`` or ``"500m"`` cores."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m)?\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not a CPU amount (use e.g. 1, 0.5, 500m)")
    return float(match.group(1)) / (1000 if match.group(2) else 1)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HandlerSpec(Strict):
    dir: str = "."
    file: str = "handler.py"
    name: str = "Handler"


class Resources(Strict):
    cpu: float | None = None
    memory: int | None = None
    gpu: float = Field(0, ge=0, description="GPUs; fractions share one on the ray backend")
    pids: int | None = Field(None, ge=8, le=65536, description="processes (sandbox; default 512)")
    ephemeral_storage: int | None = Field(
        None, alias="ephemeral-storage", description="private /tmp size (sandbox; default 1Gi)"
    )

    @field_validator("ephemeral_storage", mode="before")
    @classmethod
    def _storage(cls, v: Any) -> int | None:
        return None if v is None else parse_memory(v)

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v: Any) -> float | None:
        return None if v is None else parse_cpu(v)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> int | None:
        return None if v is None else parse_memory(v)

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, v: Any) -> float:
        return parse_cpu(v) if v is not None else 0


class Replicas(Strict):
    min: int = Field(1, ge=0, le=64)
    max: int | None = Field(None, ge=1, le=64)
    target: int | None = Field(None, ge=1, description="in-flight calls per replica to aim for")
    idle_timeout: float = Field(60.0, description="seconds idle before scaling to zero (min 0)")
    scale_down_delay: float = Field(10.0, description="seconds of lower load before scaling down")

    @field_validator("idle_timeout", "scale_down_delay", mode="before")
    @classmethod
    def _idle(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _bounds(self) -> Replicas:
        if self.max is None:
            self.max = max(self.min, 1)
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is less than min ({self.min})")
        return self


class Rollout(Strict):
    """How an ``--update`` reaches all traffic: canary steps, each judged against the stable
    version over the same window before the next (dcf.gateway.lifecycle.rollout)."""

    steps: list[int] = Field([10, 50, 100], min_length=1, max_length=20)
    interval: float = Field(
        60.0, ge=0.5, le=86400.0, description="seconds each step lasts, at least"
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="canary error rate allowed above the stable one's"
    )
    max_p95_ratio: float = Field(
        1.5, ge=1, le=1000, description="canary p95 latency allowed, as a multiple of stable's"
    )
    min_calls: int = Field(50, ge=1, le=1_000_000, description="canary calls before judging")

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(not 1 <= s <= 100 for s in v):
            raise ValueError("each step is a percentage of calls from 1 to 100")
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"steps must increase, got {v}")
        if v[0] == 100:
            raise ValueError("the first step must be below 100 (a canary takes part of the calls)")
        return v if v[-1] == 100 else [*v, 100]  # the last step promotes

    def starting_at(self, canary: int) -> Rollout:
        """These settings with ``canary`` percent as the first step (``--canary``)."""
        if not 1 <= canary <= 99:
            raise ValueError(f"a canary is 1% to 99% of calls, not {canary}%")
        return self.model_copy(update={"steps": [canary, *(s for s in self.steps if s > canary)]})


class FunctionSpec(Strict):
    """One function as the gateway stores it (the handler code travels separately)."""

    name: str
    runtime: str = "python3"
    desc: str = ""
    maintainer: str = ""
    handler: HandlerSpec = HandlerSpec()
    image: str = ""
    environment: dict[str, str] = {}
    requests: Resources = Resources()
    limits: Resources = Resources()
    network: Literal["host", "none"] = Field(
        "host", description="none: the sandboxed replica gets no network but its wire socket"
    )
    replicas: Replicas = Replicas()
    concurrency: int = Field(4, ge=1, le=1024)
    max_queue: int = Field(256, ge=0, description="calls waiting for a replica before 429")
    timeout: float = 30.0
    stream_idle_timeout: float = Field(
        60.0, description="seconds a streamed answer may go without an item before it is cut"
    )
    build_args: dict[str, str] = {}
    build: list[str] = Field(
        [], description="shell commands run in a copy of the code, once per code+inputs hash"
    )
    build_timeout: float = Field(600.0, description="seconds all build commands may take")
    skip_build: bool = False
    labels: dict[str, str] = {}
    resources: dict[str, float] = Field(
        {}, description="Ray custom resources one replica needs, e.g. {my_accelerator: 1}"
    )
    placement: Literal["spread", "pack"] = Field(
        "spread", description="replicas of this function on different nodes, or together (ray)"
    )
    start_timeout: float = Field(
        300.0, description="seconds a replica may take to be placed and load; then it fails"
    )
    auth: Literal["none", "key"] = Field(
        "none", description="key: callers must present one of its keys (dcf function keys)"
    )
    forward_authorization: bool = Field(
        False, description="hand callers' Authorization header to the handler (off: stripped)"
    )
    inputs: list[TensorSpec] = Field(
        [], description="V2 (Open Inference Protocol) inputs: [{name, datatype, shape}]"
    )
    outputs: list[TensorSpec] = Field([], description="V2 outputs: [{name, datatype, shape}]")
    rollout: Rollout | None = Field(
        None, description="an --update of this function is a canary rollout with these steps"
    )

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[TensorSpec]) -> list[TensorSpec]:
        return unique(v, "inputs")

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[TensorSpec]) -> list[TensorSpec]:
        return unique(v, "outputs")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(
                f"{v!r} is not a valid function name: use lowercase letters, digits and '-',"
                " starting and ending with a letter or digit, at most 63 characters"
            )
        return v

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        if v not in RUNTIMES:
            raise ValueError(f"unknown runtime {v!r}; available: {', '.join(RUNTIMES)}")
        return v

    @field_validator(
        "timeout", "build_timeout", "start_timeout", "stream_idle_timeout", mode="before"
    )
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("build", mode="before")
    @classmethod
    def _build(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(c, str) and c.strip() for c in v):
            raise ValueError('must be a list of shell commands, e.g. ["python fetch_model.py"]')
        return v

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        if isinstance(v, list):
            out = {}
            for item in v:
                if not isinstance(item, str) or "=" not in item:
                    raise ValueError(f"list items must be 'KEY=value' strings, got {item!r}")
                key, _, value = item.partition("=")
                out[key.strip()] = value
            return out
        if isinstance(v, dict):
            return {str(k): "" if val is None else str(val) for k, val in v.items()}
        raise ValueError("must be a map of KEY: value or a list of 'KEY=value'")

    @field_validator("resources", mode="before")
    @classmethod
    def _resources(cls, v: Any) -> dict[str, float]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a map of resource name to amount, e.g. {my_accelerator: 1}")
        out = {}
        for name, amount in v.items():
            if str(name) in ("CPU", "GPU", "memory", "cpu", "gpu"):
                raise ValueError(f"{name!r} is set with requests/limits, not resources")
            try:
                out[str(name)] = float(amount)
            except (TypeError, ValueError):
                raise ValueError(f"amount of {name!r} must be a number, got {amount!r}") from None
            if out[str(name)] <= 0:
                raise ValueError(f"amount of {name!r} must be more than zero")
        return out

    @field_validator("build_args", "labels", mode="before")
    @classmethod
    def _str_map(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a map")
        return {str(k): str(val) for k, val in v.items()}


class Project(BaseModel):
    """A parsed config.yaml: the gateway address and its functions' specs and local dirs."""

    path: Path
    gateway: str | None = None
    functions: dict[str, FunctionSpec] = {}

    def handler_dir(self, name: str) -> Path:
        return (self.path.parent / self.functions[name].handler.dir).resolve()


def _format(file: Path, function: str | None, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"] if p != "__root__") or "(function)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key {field!r}"
        where = f"function {function!r}: " if function else ""
        lines.append(f"{file}: {where}field {field!r}: {message}")
    return "\n".join(lines)


def parse_function(data: Any, name: str, file: Path | str = "<request>") -> FunctionSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: function {name!r}: must be a map of settings")
    try:
        spec = FunctionSpec.model_validate({**data, "name": name})
    except ValidationError as exc:
        raise ConfigError(_format(Path(file), name, exc)) from None
    escape = _outside(spec.handler.file)
    if escape:
        raise ConfigError(f"{file}: function {name!r}: field 'handler.file': {escape}")
    return spec


def _outside(file: str) -> str | None:
    """Why ``handler.file`` could name a file outside the function's directory, if it could.

    Checked here, for what users send, and not on the model: specs stored before the
    check must still load."""
    from pathlib import PurePosixPath

    path = PurePosixPath(file)
    if path.is_absolute():
        return f"{file!r} is an absolute path: give a path inside the handler directory"
    if ".." in path.parts:
        return f"{file!r} goes up with '..': give a path inside the handler directory"
    return None


def load_project(path: str | Path, check_dirs: bool = True) -> Project:
    """Read and validate a config.yaml, as the CLI does before it uploads anything."""
    file = Path(path)
    try:
        data = yamlsafe.load(file)  # size, encoding and alias bombs checked
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except yamlsafe.YamlError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: must be a map with 'functions:' (and optionally 'dcf:')")
    unknown = set(data) - {"dcf", "functions", "version", "provider"}
    if unknown:
        raise ConfigError(f"{file}: unknown key {sorted(unknown)[0]!r} at the top level")
    dcf_section = data.get("dcf") or {}
    if not isinstance(dcf_section, dict) or set(dcf_section) - {"gateway"}:
        raise ConfigError(f"{file}: 'dcf' may only hold 'gateway'")
    functions = data.get("functions") or {}
    if not isinstance(functions, dict):
        raise ConfigError(f"{file}: 'functions' must be a map of function name to settings")
    project = Project(path=file.resolve(), gateway=dcf_section.get("gateway"))
    for name, settings in functions.items():
        spec = parse_function(settings, str(name), file)
        project.functions[spec.name] = spec
        if check_dirs:
            directory = project.handler_dir(spec.name)
            if not directory.is_dir():
                raise ConfigError(
                    f"{file}: function {spec.name!r}: field 'handler.dir': "
                    f"directory {directory} does not exist"
                )
            if not (directory / spec.handler.file).is_file():
                raise ConfigError(
                    f"{file}: function {spec.name!r}: field 'handler.file': "
                    f"{directory / spec.handler.file} does not exist"
                )
    return project
