"""How the bench times and measures: progress lines, the median of timed calls (CUDA events on the GPU), calls
interleaved round by round on a noisy CPU, the peak memory of one step, and the dense matmul peak of the device."""

import contextlib
import gc
import statistics
import sys
import time

import torch

from .. import ops
from ..testing import relative_error

START = time.perf_counter()


def progress(message):
    """One progress line on stderr, flushed at once, with the seconds since the start."""
    print(f"[bench {time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_s(step, batch, device):
    """Seconds the first call of ``step`` takes (compilation, autotuning and lazy set-up included)."""
    synchronize(device)
    start = time.perf_counter()
    out = step(*batch)
    synchronize(device)
    return time.perf_counter() - start, out


def median_ms(step, batches, warmup, reps, device):
    """Median time of ``step`` over ``reps`` timed calls after ``warmup`` calls, rotating ``batches``."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    synchronize(device)
    times = []
    for i in range(reps):
        batch = batches[(warmup + i) % len(batches)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            step(*batch)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def inference_row(config, label, infer, started, batches, exact_step, warmup, reps, device, **extra):
    """The result row of a model that only infers (a peer runtime, an inference snapshot; no training step): its
    first call timed from ``started`` (the ``time.perf_counter()`` when its set-up began), its output's error against
    the float64 reference's, and the median of ``infer(x, target)``; ``extra`` fields after the label."""
    out = infer(*batches[0])
    result = {"config": config, "label": label, **extra, "first_train_s": None,
              "first_infer_s": time.perf_counter() - started,
              "infer_rel_err": relative_error(out, exact_step.infer_out)}
    progress(f"{label}: inference, {warmup} warm-up + {reps} timed")
    result["infer_ms"] = median_ms(infer, batches, warmup, reps, device)
    return result


def interleaved_median_ms(runs, reps):
    """Median ms of each zero-argument call of ``runs`` (name -> call), the calls taken in turn ``reps`` times
    after one untimed round, so that a noisy machine moves them alike (the CPU benchmarks' side-by-side timing).
    Each round starts one call later than the one before, so every call runs at every place in the round alike:
    with a fixed order, two instances of the same eager model ran 5-8% apart by place alone (benchmarks/RESULTS.md)."""
    names = list(runs)
    times = {name: [] for name in names}
    for rep in range(reps + 1):
        start = rep % len(names)
        for name in names[start:] + names[:start]:
            begin = time.perf_counter()
            runs[name]()
            if rep:
                times[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def proc_status_bytes(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_growth_mib(model, step, batch, device):
    """Peak memory of one ``step`` above what is held before it (weights, inputs), in MiB.

    CUDA: the caching allocator's peak. CPU: the peak RSS (VmHWM, reset through /proc/self/clear_refs),
    meaningful in a process started with CPU_MEMORY_ENV (see cpu_peak_memory).
    """
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(*batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        base = proc_status_bytes("VmRSS")
        step(*batch)
        peak = proc_status_bytes("VmHWM")
    return (peak - base) / 2**20


def matmul_peak_tflops(device, dtype):
    """Measured dense matmul throughput of ``device`` in ``dtype`` (CUDA: 8192^3, mean of 10 after 3 warm-up;
    CPU: 2048^3), TF/s: the peak the model FLOPs are held against. float32 on CUDA runs in TF32 exactly where the
    convs do (peak_in_tf32), so that the peak and the convs held against it multiply alike."""
    with matmul_tf32(peak_in_tf32(device, dtype)):
        return timed_matmul_tflops(device, dtype)


def peak_in_tf32(device, dtype):
    """Whether matmul_peak_tflops measures in TF32: float32 on CUDA while ATen's float32 convs run in TF32."""
    return device.type == "cuda" and dtype == torch.float32 and ops.cudnn_conv_tf32()


@contextlib.contextmanager
def matmul_tf32(enabled):
    """torch's float32 CUDA matmuls in TF32 (``enabled``) or in float32 inside the block, as before after it."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"  # older torch: allow_tf32
    previous = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def timed_matmul_tflops(device, dtype):
    """TF/s of n x n matmuls in ``dtype`` under the current precision settings (matmul_peak_tflops's sizes)."""
    n = 8192 if device.type == "cuda" else 2048
    reps = 10 if device.type == "cuda" else 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if device.type == "cuda" else 1):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
