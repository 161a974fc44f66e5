"""Which device a run trains on and in which precision: --device, and --amp resolved against what the
hardware computes natively; `autocast` is the one place the precision becomes a context.
"""
import contextlib

import torch

from bert import cpu_native_bf16
from errors import InputError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: a GPU of compute capability 8.0 or later (Ampere on), or a CPU
    with AVX512-BF16/AMX. torch.cuda.is_bf16_supported() is True on a V100 or T4 too, where bf16 is
    emulated; on CPUs without AVX-512 (AVX2 only) bf16 is emulated and about 10-20x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return cpu_native_bf16()


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp's precision on `device`: auto is bf16 where it is native, else none (fp32). bf16 asked for
    where it is emulated runs, with one warning. fp16 runs on a CPU too: there it is no faster than fp32,
    it exists so that the GPU's fp16 path (GradScaler, unscaling, skipped steps) can be checked anywhere."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "bf16" and not native_bf16(device):
        what = ("this GPU (compute capability below 8.0)" if device.type == "cuda"
                else "this CPU (no AVX512-BF16 or AMX)")
        print(f"warning: --amp bf16 on {what} is emulated, about 10-20x slower than fp32 on an AVX2-only "
              f"CPU; --amp auto would train in fp32 here", flush=True)
    return amp


def autocast(amp: str, device: torch.device):
    """The forward passes' context for a resolved --amp: nothing for fp32, else torch.autocast in bf16 or fp16."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
