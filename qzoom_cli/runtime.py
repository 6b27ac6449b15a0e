"""Choosing where and how a model runs (device, dtype, attention kernel) and measuring memory."""

from __future__ import annotations

import gc
import importlib.util
import os
import resource
import sys
from dataclasses import dataclass

import torch

from .errors import EnvironmentProblem, UsageError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
ATTN_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
COMPILE_CHOICES = ("auto", "on", "max", "off")
DECODERS = ("eager", "static_cache", "cuda_graphs", "static_cache+inductor", "cuda_graphs+inductor")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    attn: str
    decoder: str = "eager"
    notes: tuple[str, ...] = ()  # why the decoder asked for could not be used

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or $QZOOM_DEVICE) picks cuda, then mps, then cpu; explicit devices are checked."""
    if name is None or name.strip().lower() == "auto":
        name = os.environ.get("QZOOM_DEVICE") or "auto"
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem("--device cuda was asked for but torch sees no CUDA device (see `qzoom doctor`)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise EnvironmentProblem(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EnvironmentProblem("--device mps was asked for but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA GPUs that support it, fp16 on other GPUs and MPS, fp32 on CPU."""
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32")
    return DTYPES[name]


def resolve_attn(name: str | None, device: torch.device, fast_decode: bool = False) -> str:
    """'auto': sdpa when the fast decode path will run (its graphs need it; sdpa's own flash kernel
    serves the prefill), else flash_attention_2 on CUDA when the package is importable, else sdpa."""
    name = (name or "auto").lower()
    if name not in ATTN_CHOICES:
        raise UsageError(f"unknown attention {name!r}: use {', '.join(ATTN_CHOICES)}")
    if name == "auto":
        usable = device.type == "cuda" and flash_attention_available() and not fast_decode
        return "flash_attention_2" if usable else "sdpa"
    if name == "flash_attention_2" and not (device.type == "cuda" and flash_attention_available()):
        raise EnvironmentProblem("flash_attention_2 needs a CUDA device and the flash-attn package (see `qzoom doctor`)")
    return name


def wants_fast_decode(compile: str | None, device: torch.device) -> bool:
    """Whether `--compile` asks for the static-cache decoder on this device."""
    name = (compile or "auto").lower()
    if name not in COMPILE_CHOICES:
        raise UsageError(f"unknown --compile {name!r}: use {', '.join(COMPILE_CHOICES)}")
    return name in ("on", "max") or (name == "auto" and device.type == "cuda")


def resolve_decoder(compile: str | None, device: torch.device, attn: str) -> tuple[str, str | None]:
    """The greedy decoder for `--compile` (one of DECODERS), and why it is not the one asked for.

    'auto' captures the decode step as a CUDA graph on CUDA and keeps the eager loop elsewhere;
    'on' insists (without CUDA the static cache runs uncaptured); 'max' also fuses the step's
    small kernels with torch.compile first (a slow first answer, faster decoding after); 'off'
    is the eager loop. The static cache hands attention a boolean slot mask, which only the sdpa
    path takes as it is.
    """
    if not wants_fast_decode(compile, device):
        return "eager", None
    if attn != "sdpa":
        return "eager", f"the fast decode path needs --attn sdpa (not {attn}); decoding with the eager loop"
    fused = "+inductor" if compile.lower() == "max" else ""
    if device.type != "cuda":
        return "static_cache" + fused, "CUDA graphs need a CUDA device; decoding on the static cache without capture"
    return "cuda_graphs" + fused, None


def resolve_runtime(device: str | None = None, dtype: str | None = None, attn: str | None = None,
                    compile: str | None = None) -> Runtime:
    chosen = resolve_device(device)
    attn_name = resolve_attn(attn, chosen, fast_decode=wants_fast_decode(compile, chosen))
    decoder, note = resolve_decoder(compile, chosen, attn_name)
    return Runtime(chosen, resolve_dtype(dtype, chosen), attn_name, decoder, (note,) if note else ())


def release_memory() -> None:
    """Memory of models just dropped goes back (before the next one loads, or training starts)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, source): CUDA's peak allocation since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return rss * scale / 2**30, "process_peak_rss"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
