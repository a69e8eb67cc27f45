"""What this machine is good at, and the precision and strategy checks that depend on it."""

from __future__ import annotations

import importlib.util
import os
import platform

import torch
from omegaconf import DictConfig

from framework.errors import ConfigError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "model_parallel")
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only on CPUs with AVX-512 BF16 or AMX; elsewhere they are ~50x slower than fp32."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_gpu(accelerator: str) -> bool:
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def auto_precision(has_gpu: bool) -> str:
    """bf16-mixed where the hardware runs bf16 fast (recent GPUs, AVX-512 BF16/AMX CPUs), else 32-true."""
    if has_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def check_machine(cfg: DictConfig) -> None:
    """Precision, strategy and accelerator that this machine can run; resolves precision=auto in place."""
    from framework.config import one_of

    one_of("precision", cfg.precision.name, PRECISIONS)
    one_of("strategy", cfg.strategy.name, STRATEGIES)
    one_of("trainer.accelerator", cfg.trainer.accelerator, ACCELERATORS)
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", f"'{cfg.trainer.accelerator}' but this machine has no CUDA GPU (use auto or cpu)")
    has_gpu = uses_gpu(cfg.trainer.accelerator)
    if cfg.precision.name == "16-mixed" and not has_gpu:
        raise ConfigError("precision", "16-mixed needs a CUDA GPU; on the CPU use bf16-mixed or 32-true")
    if cfg.strategy.name in GPU_ONLY_STRATEGIES and not has_gpu:
        raise ConfigError("strategy", f"{cfg.strategy.name} needs CUDA GPUs; on the CPU use ddp or ddp_spawn")
    if cfg.strategy.name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy", "deepspeed is not installed (pip install deepspeed)")
        if cfg.strategy.stage not in (1, 2, 3):
            raise ConfigError("strategy.stage", f"ZeRO stage must be 1, 2 or 3, got {cfg.strategy.stage}")
    if cfg.precision.name == "auto":
        cfg.precision.name = auto_precision(has_gpu)
    if cfg.strategy.name == "auto" and _device_count(cfg.trainer.devices) > 1:
        # Lightning's auto would pick DDP with its own launcher, which re-runs the command line in each
        # child (a -m sweep in every child: Lightning #11300); ours starts the ranks from the stage config.
        cfg.strategy.name = "ddp"


def _device_count(devices) -> int:
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    return int(devices) if str(devices).isdigit() else 1


def machine_info() -> dict:
    """CPU model, cores, torch version and the CPU features that decide whether bf16 is fast."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = _cpu_flags()
    return {
        "cpu": model or "unknown",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def describe_machine(machine: dict | None = None) -> str:
    machine = machine or machine_info()
    bf16 = "with" if machine["avx512_bf16"] or machine["amx_bf16"] else "without"
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores ({bf16} AVX-512 BF16/AMX)"
    return f"{where}, torch {machine['torch']}"
