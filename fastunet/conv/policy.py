"""The hardware-dependent choices of fast mode's CPU convolutions, in one table.

Each entry names a choice whose best value depends on the CPU at hand, its default on this CPU (from what the CPU
reports at import), its unit, and the machine and command that measured the rule. ``fastunet.conv.policy.value(name)``
reads one; ``override(name=value, ...)`` sets some for a ``with`` block (the tests force every branch of every
hardware-dependent choice on any CPU through it; users can too).
"""

import contextlib
import os
import threading
from typing import NamedTuple

import torch


class Entry(NamedTuple):
    """One choice: its value on this CPU, the unit, and where the rule behind the default was measured."""

    value: object
    unit: str
    measured: str


def onednn_isa():
    """The widest instruction set oneDNN's float32 convolutions use here: "avx512" or "avx2" (or older, "other").
    ``ONEDNN_MAX_CPU_ISA`` caps it as it caps oneDNN (AVX2, AVX, SSE41 and the like name an older set)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not cap.startswith(("AVX512", "AVX10", "AMX", "ALL", "DEFAULT")):
        return "avx2" if cap.startswith("AVX2") else "other"
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "other")


def _has_native_dot(dtype):
    """Whether this CPU has dot-product instructions for ``dtype`` (bfloat16: AVX-512 BF16 or AMX; float16:
    AMX-FP16), which oneDNN's convolutions of that dtype use; without them it emulates them. A torch without the
    probe (private API) answers False."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported") if dtype == torch.bfloat16 else (
        "_is_amx_fp16_supported",)
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)


# The few-pixel GEMMs' threshold where oneDNN's float32 kernels are AVX2-class (gemm_train_max_pixels below).
GEMM_TRAIN_MAX_PIXELS_AVX2 = 64

_TABLE = {
    # Fast mode's CPU float32 training convs of at most this many pixels per image run as im2col + GEMMs instead of
    # oneDNN. With AVX2-class oneDNN kernels the GEMMs were faster (137 vs 183 ms forward + backward at 1024 -> 1024,
    # 2 x 8 x 8) and more accurate (forward 1.8e-7 vs 5.7e-7-1.0e-6 relative error at the deep levels). oneDNN's
    # AVX-512 kernels in the weights' layout are as fast at these sizes and 1.2-1.6x more accurate than the GEMMs
    # (forward 1.5-2.0e-7, input gradient 2.0-2.2e-7 against 3.3e-7), so there the GEMMs are off.
    "gemm_train_max_pixels": Entry(
        0 if onednn_isa() == "avx512" else GEMM_TRAIN_MAX_PIXELS_AVX2, "pixels per image",
        "GEMM vs oneDNN: 2-core AVX2 EPYC, benchmarks/RESULTS.md (convolution measurements); accuracy: 2-core Xeon "
        "(Sapphire Rapids, AVX-512), ONEDNN_MAX_CPU_ISA=AVX2 for the AVX2 column, benchmarks/RESULTS.md 'Issue 31'"),
    # Whether fast mode's CPU float32 training runs its wide 3x3 convs as Winograd F(2x2, 3x3) where
    # fastunet.winograd.pays, and an NCHW input in channels_last inside (fastunet.U_Net._channels_last_inside).
    # Against oneDNN's AVX2 kernels both are faster and Winograd is more accurate; oneDNN's AVX-512 kernels in NCHW
    # (the seed's layout) are 2-2.6x more accurate than Winograd and 2-5x more accurate than its own channels_last
    # kernels, so that a training step's gradients went over twice the seed's error: on AVX-512 both are off.
    # Inference keeps both (its output stays within the error rule).
    "winograd_train": Entry(
        onednn_isa() != "avx512", "bool",
        "speed: 2-core AVX2 EPYC, benchmarks/RESULTS.md; accuracy: 2-core Xeon (Sapphire Rapids), 'Issue 31'"),
    "channels_last_train": Entry(
        onednn_isa() != "avx512", "bool", "as winograd_train"),
    # Whether fast mode's CPU convolutions of bfloat16 / float16 stay in that dtype (the CPU has dot products for it)
    # or run in float32 on the exactly upcast inputs: oneDNN's emulated bfloat16 convs made a 1 x 3 x 64^2 training
    # step 26x as slow as float32 on a CPU without them.
    "native_dot_bfloat16": Entry(
        _has_native_dot(torch.bfloat16), "bool (lscpu: avx512_bf16 or amx_bf16)",
        "2-core AVX2 EPYC, benchmarks/RESULTS.md (bfloat16 autocast on the CPU)"),
    "native_dot_float16": Entry(
        _has_native_dot(torch.float16), "bool (lscpu: amx_fp16)", "as native_dot_bfloat16"),
}

_overrides = threading.local()


def value(name):
    """The value of choice ``name`` now: the innermost ``override`` of this thread, else the table's."""
    for layer in reversed(getattr(_overrides, "stack", ())):
        if name in layer:
            return layer[name]
    return _TABLE[name].value


def native_dot(dtype):
    """Whether fast mode's CPU convolutions of ``dtype`` (bfloat16 or float16) stay in it."""
    return value("native_dot_bfloat16" if dtype == torch.bfloat16 else "native_dot_float16")


def table():
    """``{name: Entry}`` with the values in force now (overrides included)."""
    return {name: entry._replace(value=value(name)) for name, entry in _TABLE.items()}


@contextlib.contextmanager
def override(**choices):
    """Sets the named choices for the ``with`` block in this thread (an unknown name is an error)."""
    unknown = sorted(set(choices) - set(_TABLE))
    if unknown:
        raise KeyError(f"fastunet.conv.policy: no choice named {', '.join(unknown)}; the choices are "
                       f"{', '.join(sorted(_TABLE))}")
    stack = _overrides.__dict__.setdefault("stack", [])
    stack.append(dict(choices))
    try:
        yield
    finally:
        stack.pop()
