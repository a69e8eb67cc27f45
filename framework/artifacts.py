"""A stage's artifact on disk, written so that a crash never leaves a half artifact that looks whole.

Layout (ARCHITECTURE.md): <stage_dir>/{model/, metrics.json, config.yaml, fingerprint, COMPLETE, checkpoints/}.
Every file is written to a temporary name and renamed; COMPLETE is renamed into place last, so a
directory without it is not an artifact.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

import framework
from framework.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
FINGERPRINT = "fingerprint"
METRICS = "metrics.json"
CONFIG = "config.yaml"
MODEL = "model"
MANIFEST = "manifest.json"  # size and sha256 of every file of the artifact, written just before COMPLETE

# What a model/ directory holds, told by the file that only that format writes (checked in this order):
# ONNX (framework.export.onnx; first: the quantize stage's onnxruntime backend may add a torchao copy for plain
# transformers), torchao-quantized, low-rank, layer-shared, GGUF, dense HF.
FORMAT_MARKERS = (
    ("onnx", "model.onnx"),
    ("quantized", "quantization.json"),
    ("lowrank", "lowrank.json"),
    ("shared", "sharing.json"),
    ("gguf", "*.gguf"),
    ("dense", "config.json"),
)


@contextlib.contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield a temporary directory beside `target`; on success it replaces `target` in one rename."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        yield tmp
        shareable(tmp)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if needed) for the duration of the block.

    One process at a time, on this machine or on any node sharing the filesystem (POSIX record locks,
    which NFS carries); the lock dies with its process, so a crash never leaves it held.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("waiting for another process to finish with %s", path)
            fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def shareable(directory: str) -> None:
    """Ordinary permissions (as the umask allows) for a tree whose temporary origin made it private:
    mkdtemp creates 0700 and some writers 0600 files, yet artifacts and caches are meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; artifacts are for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fingerprint(stage_config: DictConfig | dict, input_fingerprints: list[str] = ()) -> str:
    """Hash of what determines a stage's result: its config, its inputs' fingerprints, our version."""
    if isinstance(stage_config, DictConfig):
        stage_config = OmegaConf.to_container(stage_config, resolve=True)
    payload = json.dumps(
        {"config": stage_config, "inputs": list(input_fingerprints), "version": framework.__version__},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def is_complete(stage_dir: str, expected_fingerprint: str | None = None) -> bool:
    if not os.path.isfile(os.path.join(stage_dir, COMPLETE)):
        return False
    return expected_fingerprint is None or read_fingerprint(stage_dir) == expected_fingerprint


def read_fingerprint(stage_dir: str) -> str | None:
    path = os.path.join(stage_dir, FINGERPRINT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def model_format(model_dir: str) -> str | None:
    """The format of a model directory (FORMAT_MARKERS), or None when it holds no model."""
    for name, marker in FORMAT_MARKERS:
        if any(os.path.isfile(path) for path in glob.glob(os.path.join(glob.escape(model_dir), marker))):
            return name
    return None


def check_artifact(stage_dir: str, key: str) -> str:
    """Refuse, in one line naming `key`, a path that is not a whole, intact artifact; return its model format."""
    if not os.path.isdir(stage_dir):
        raise ConfigError(key, f"'{stage_dir}' does not exist" if not os.path.exists(stage_dir) else f"'{stage_dir}' is a file, not an artifact directory")
    if not is_complete(stage_dir):
        raise ConfigError(key, f"'{stage_dir}' is not a complete artifact (no {COMPLETE} file: not a stage's output, or cut before it finished)")
    damage = damaged(stage_dir)
    if damage:
        raise ConfigError(key, f"'{stage_dir}' is damaged: {damage} (rerun the command that wrote it)")
    found = model_format(os.path.join(stage_dir, MODEL))
    if found is None:
        raise ConfigError(key, f"'{stage_dir}' holds no model (nothing readable in {MODEL}/)")
    return found


def _artifact_files(stage_dir: str) -> list[str]:
    """The files a manifest covers, relative to the stage directory: model/ and the metrics and config."""
    model_dir = os.path.join(stage_dir, MODEL)
    files = [os.path.relpath(os.path.join(root, name), stage_dir) for root, _, names in os.walk(model_dir) for name in names]
    return sorted(files) + [METRICS, CONFIG]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(stage_dir: str) -> None:
    files = {name: {"bytes": os.path.getsize(os.path.join(stage_dir, name)), "sha256": _sha256(os.path.join(stage_dir, name))} for name in _artifact_files(stage_dir)}
    atomic_write_json(os.path.join(stage_dir, MANIFEST), {"files": files})


def damaged(stage_dir: str) -> str | None:
    """What is wrong with a complete artifact's files against its manifest (None: intact, or written before
    manifests existed). Sizes are compared first, so a truncated file is found without hashing."""
    path = os.path.join(stage_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return f"its {MANIFEST} is unreadable"
    for name, expected in files.items():
        full = os.path.join(stage_dir, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != expected["bytes"]:
            return f"{name} has {os.path.getsize(full)} bytes, {expected['bytes']} when written"
    for name, expected in files.items():
        if _sha256(os.path.join(stage_dir, name)) != expected["sha256"]:
            return f"{name} has changed since it was written (sha256 differs)"
    return None


def read_metrics(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, METRICS)) as f:
        return json.load(f)


def holds_classifier(source: str | None) -> bool:
    """Whether the artifact in `source` holds a sequence classifier (no text to generate, no KV cache to export)."""
    return bool(source) and is_classifier(os.path.join(source, MODEL))


def is_classifier(model_dir: str) -> bool:
    """Whether a model directory holds a sequence classifier (its config names a ...ForSequenceClassification)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return any(a.endswith("ForSequenceClassification") for a in json.load(f).get("architectures") or [])


def invalidate(stage_dir: str) -> None:
    """Mark a stage as not done (before redoing it), keeping its checkpoints for resume."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(stage_dir, COMPLETE))


def write_artifact(stage_dir: str, save_model, metrics: dict | Callable[[str], dict], config: DictConfig | dict, stage_fingerprint: str) -> None:
    """Write model/ (through `save_model(directory)`), metrics, config and fingerprint, then COMPLETE.

    `metrics` may be a function of the written model directory: a format measured in the runtime that
    reads it (an ONNX or GGUF export) is measured from its files.
    """
    invalidate(stage_dir)
    with atomic_directory(os.path.join(stage_dir, MODEL)) as tmp:
        save_model(tmp)
    if callable(metrics):
        metrics = metrics(os.path.join(stage_dir, MODEL))
    metrics = dict(metrics, size_bytes=directory_size(os.path.join(stage_dir, MODEL)))
    atomic_write_json(os.path.join(stage_dir, METRICS), metrics)
    config_yaml = OmegaConf.to_yaml(config if isinstance(config, DictConfig) else OmegaConf.create(config))
    atomic_write_text(os.path.join(stage_dir, CONFIG), config_yaml)
    atomic_write_text(os.path.join(stage_dir, FINGERPRINT), stage_fingerprint + "\n")
    write_manifest(stage_dir)
    atomic_write_text(os.path.join(stage_dir, COMPLETE), stage_fingerprint + "\n")


def directory_size(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names
    )
