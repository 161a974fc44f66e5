"""Which precision --amp gives on which hardware (hardware.py)."""

import pytest
import torch

import hardware
from hardware import native_bf16, resolve_amp


def test_auto_amp_is_bf16_only_with_native_support(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == ("bf16" if native_bf16(cpu) else "none")
    assert resolve_amp("fp16", cpu) == "fp16"  # runs on a CPU, to check the GPU's fp16 path
    for native in (True, False):
        monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)
        assert resolve_amp("auto", cpu) == ("bf16" if native else "none")
        capsys.readouterr()
        assert resolve_amp("bf16", cpu) == "bf16"  # asked for, it runs, but says so where it is emulated
        assert ("warning: --amp bf16 on this CPU (no AVX512-BF16 or AMX) is emulated" in capsys.readouterr().out) \
            is not native


@pytest.mark.parametrize("capability,expected", [((7, 0), "none"), ((7, 5), "none"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_amp_on_a_gpu_reads_its_compute_capability(monkeypatch, capability, expected):
    """A V100 (7.0) or T4 (7.5) reports torch.cuda.is_bf16_supported() True, emulating bf16: auto is fp32 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert resolve_amp("auto", torch.device("cuda")) == expected
