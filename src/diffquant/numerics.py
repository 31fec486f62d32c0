"""What changes floating-point results: the part cache keys name, and the record metrics.json keeps.

Two functions, two jobs:

* :func:`numerics_identity` — part of every cache key of a computed result (through
  :func:`diffquant.calib.collect.model_identity`): the device type; on CPU the intra-op thread
  count (summation order: W4A4 ``ptq`` on ldm_digits calibrated with 1 thread gives FID→FP
  0.621, with 2 threads 0.555); the CPU capability torch dispatches its vectorised kernels on
  (``DEFAULT`` / ``AVX2`` / ``AVX512``: other kernels, other low bits — also of the CPU-drawn
  noise on a GPU); the torch version (kernels and their defaults change between releases); on
  CUDA the device name and the cuDNN version. :mod:`diffquant.cache` says which keys hold it.
* :func:`environment` — the ``environment`` block of ``metrics.json``: the above plus what helps
  explain a difference without being a cause one can key on reliably: the CPU model and its
  instruction-set flags (``avx2``, ``avx512f``, ``amx``), the diffusers / transformers / Python
  versions.
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

#: /proc/cpuinfo flags recorded (``amx``: any of ``amx_bf16``, ``amx_tile``, ``amx_int8``).
ISA_FLAGS = ("avx2", "avx512f", "amx")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[Optional[str], frozenset[str]]:
    """(model name, flags) of the first processor in ``/proc/cpuinfo``; (None, {}) elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    model, flags = None, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def isa_flags() -> dict[str, bool]:
    """Whether the CPU has each instruction set of :data:`ISA_FLAGS`."""
    flags = _cpuinfo()[1]
    return {name: any(f == name or f.startswith(name + "_") for f in flags) for name in ISA_FLAGS}


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch on (``AVX512``, ``AVX2``, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def device_name(device: torch.device | str) -> str:
    """The accelerator's name on CUDA (``NVIDIA H100 80GB HBM3``), the CPU model otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def numerics_identity(device: torch.device | str) -> dict[str, Any]:
    """What changes floating-point results of the same code and settings (module doc): part of
    every cache key of a computed result, so that a cached result is only reused where
    recomputing it would give the same numbers."""
    kind = torch.device(device).type
    ident: dict[str, Any] = {
        "device": kind,
        "cpu_threads": torch.get_num_threads() if kind == "cpu" else None,
        "cpu_capability": cpu_capability(),
        "torch": torch.__version__,
    }
    if kind == "cuda":
        ident["device_name"] = device_name(device)
        ident["cudnn"] = torch.backends.cudnn.version()
    return ident


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """The ``environment`` block of ``metrics.json``: where and with what the numbers were made."""
    device = torch.device(device)
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": isa_flags(),
        "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
    }
