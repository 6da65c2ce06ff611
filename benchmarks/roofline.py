"""Roofline of the fused ops and the convolutions of one fast-mode training step, op by op and level by level.

    python benchmarks/roofline.py [--batch 16 --size 256 --dtype bfloat16 --device cuda] [--json out.json]

For every memory-bound fused op (``fastunet.ops.*``) at every U-Net level it counts the bytes the op must move
(each tensor it reads or writes, once), times the op on the device in every implementation that runs there
(on CUDA: the compiled CUDA kernels and the Triton kernels, side by side; median of ``--reps``, inputs drawn
at random, channels_last), and gives the fastest one's bandwidth and the fraction of the floor
``bytes / bandwidth``, with the bandwidth measured by a device-to-device copy. For the 3x3 convolutions
(cuDNN/oneDNN, forward) it counts the FLOPs and gives the achieved TF/s against a matmul of the same dtype.
Prints a markdown table.
"""

import argparse
import contextlib
import json
import sys
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastunet import _ext, ops
from fastunet.bench import PEAK_PRECISION, matmul_peak_tflops, median_ms, peak_in_tf32

ENCODER = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1024)]
DECODER = [(1024, 512), (512, 256), (256, 128), (128, 64)]  # Up5..Up2 in, out channels


def timed_ms(fn, device, reps):
    """Median time of ``fn()`` in ms after two warm-up calls (fastunet.bench's timing: CUDA events on the GPU)."""
    return median_ms(fn, [()], 2, reps, device)


def copy_bandwidth_gbs(device, reps):
    """Device-to-device copy of 1 GiB (64 MiB on the CPU), bytes read + written per second."""
    n = (2**30 if device.type == "cuda" else 2**26) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 2 * src.nbytes / (timed_ms(lambda: dst.copy_(src), device, reps) * 1e-3) / 1e9


class Implementation(NamedTuple):
    """One implementation of the fused ops: the namespace that holds them and what ``ops.select_cuda_kernels``
    must register while they are timed (None: nothing to register)."""

    ops: object
    cuda_kernels: Optional[str]


def implementations(device):
    """{backend name: Implementation} of every implementation that runs on ``device``. On CUDA both go through
    ``torch.ops.fastunet`` (the same dispatch cost), with the compiled CUDA kernels registered for the "cuda" rows
    and the Triton kernels for the "triton" rows."""
    found = {}
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if _ext.has_cuda_kernels() and _ext.cuda_arch_problem(capability) is None:
            found["cuda"] = Implementation(torch.ops.fastunet, "compiled")
        if ops._triton_usable():
            found["triton"] = Implementation(torch.ops.fastunet, "triton")
    elif _ext.available():
        found["compiled"] = Implementation(torch.ops.fastunet, None)
    references = types.SimpleNamespace(**{op: getattr(ops, op + "_ref") for op in ops.FUSED_OPS})
    return found or {"reference": Implementation(references, None)}


@contextlib.contextmanager
def serving(impl):
    """``impl``'s kernels registered for CUDA inside the block (select_cuda_kernels), the previous choice after."""
    if impl.cuda_kernels is None:
        yield
        return
    previous = ops._cuda_kernels
    chosen = ops.select_cuda_kernels(impl.cuda_kernels)
    if chosen != impl.cuda_kernels:
        ops.select_cuda_kernels(previous)
        raise RuntimeError(f"roofline: the {impl.cuda_kernels} CUDA kernels cannot serve here ({chosen} would)")
    try:
        yield
    finally:
        ops.select_cuda_kernels(previous)


def fused_op_cases(impl, n, c, h, w, upscale, pool, dtype, device):
    """(name, fn, bytes) of the fused ops of namespace ``impl`` on one layer: a conv output z of C channels
    (4C sub-pixel phases when upscale is 2) whose BN+ReLU output is [n, c, upscale*h, upscale*w]."""
    s = upscale
    cl = torch.channels_last
    z = torch.randn(n, s * s * c, h + s - 1, w + s - 1, device=device, dtype=dtype).contiguous(memory_format=cl)
    oh, ow = s * h, s * w
    out = torch.empty(n, c, oh, ow, device=device, dtype=dtype, memory_format=cl)
    pooled = torch.empty(n, c, oh // 2, ow // 2, device=device, dtype=dtype, memory_format=cl) if pool else None
    grad = torch.randn_like(out)
    grad_pooled = torch.randn_like(pooled) if pool else None
    vec = lambda: torch.rand(c, device=device) + 0.5  # noqa: E731
    scale, shift, mean, invstd, sum_dy, sum_dy_xmu = (vec() for _ in range(6))
    e = torch.finfo(dtype).bits // 8
    z_bytes, y_bytes = z.numel() * e, out.numel() * e
    p_bytes = pooled.numel() * e if pool else 0
    return [
        ("bn_stats", lambda: impl.bn_stats(z, s), z_bytes),
        ("bn_relu_pool", lambda: impl.bn_relu_pool(z, scale, shift, s, out, pooled), z_bytes + y_bytes + p_bytes),
        ("bn_relu_backward_reduce", lambda: impl.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, s),
         z_bytes + y_bytes + p_bytes),
        ("bn_relu_backward_apply", lambda: impl.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean,
                                                                       invstd, sum_dy, sum_dy_xmu, s),
         2 * z_bytes + y_bytes + p_bytes),
    ]


def layers(batch, size):
    """(level name, C, h, w, upscale, pool, conv Cin) of every BN layer of the U-Net."""
    out = []
    for level, (cin, cout) in enumerate(ENCODER, 1):
        side = size >> (level - 1)
        out += [(f"Conv{level}.1", cout, side, side, 1, False, cin),
                (f"Conv{level}.2", cout, side, side, 1, level < 5, cout)]
    for i, (cin, cout) in enumerate(DECODER):
        level, side = 5 - i, size >> (3 - i)  # the up block's output side
        out += [(f"Up{level}", cout, side // 2, side // 2, 2, False, cin),
                (f"Up_conv{level}.1", cout, side, side, 1, False, 2 * cout),
                (f"Up_conv{level}.2", cout, side, side, 1, False, cout)]
    return out


def parse_args(argv):
    """The command-line options (batch and size default to None: main picks them by device)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="default 16 on CUDA, 1 on the CPU")
    parser.add_argument("--size", type=int, help="default 256 on CUDA, 64 on the CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows as JSON here")
    return parser.parse_args(argv)


def fused_op_rows(name, impls, batch, c, h, w, s, pool, dtype, device, reps, bandwidth):
    """The rows of one layer's fused ops: bytes, each backend's time, the fastest one's GB/s and the floor."""
    timed = {}  # op -> (bytes, {backend: ms})
    for backend, impl in impls.items():
        with serving(impl):
            for op, fn, nbytes in fused_op_cases(impl.ops, batch, c, h, w, s, pool, dtype, device):
                timed.setdefault(op, (nbytes, {}))[1][backend] = timed_ms(fn, device, reps)
    rows = []
    for op, (nbytes, by_backend) in timed.items():
        best = min(by_backend, key=by_backend.get)
        ms = by_backend[best]
        rows.append(dict(layer=name, op=op, mbytes=nbytes / 1e6, ms_by_backend=by_backend, fastest=best, ms=ms,
                         gbs=nbytes / (ms * 1e-3) / 1e9, floor_ms=nbytes / bandwidth / 1e6))
    return rows


def conv_row(name, batch, c, h, w, cin, dtype, device, reps, peak):
    """The row of one layer's 3x3 convolution forward: GFLOP, time, TF/s and the floor at the matmul peak."""
    x = torch.randn(batch, cin, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, cin, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * h * w * cin * c * 9
    ms = timed_ms(lambda: F.conv2d(x, weight, padding=1), device, reps)
    return dict(layer=name, op="conv3x3 forward", gflop=flops / 1e9, ms=ms,
                tflops=flops / (ms * 1e-3) / 1e12, floor_ms=flops / (peak * 1e12) * 1e3)


def measure_rows(impls, batch, size, dtype, device, reps, bandwidth, peak):
    """The rows of every layer (its fused ops, and its conv where it has no upsampling), with their of_floor."""
    rows = []
    for name, c, h, w, s, pool, cin in layers(batch, size):
        rows += fused_op_rows(name, impls, batch, c, h, w, s, pool, dtype, device, reps, bandwidth)
        if s == 1:
            rows.append(conv_row(name, batch, c, h, w, cin, dtype, device, reps, peak))
    for row in rows:
        row["of_floor"] = row["floor_ms"] / row["ms"]
    return rows


def print_table(rows, impls):
    """Prints the markdown table, a time column per backend, then each backend's fused-op total against the floor."""
    print(f"| layer | op | MB or GFLOP | {' | '.join(b + ' ms' for b in impls)} | GB/s or TF/s (fastest) | floor ms "
          "| floor / time |")
    print("|---|---|---:|" + "---:|" * len(impls) + "---:|---:|---:|")
    for r in rows:
        size_cell = f"{r['mbytes']:.1f} MB" if "mbytes" in r else f"{r['gflop']:.1f} GFLOP"
        rate = f"{r['gbs']:.0f} GB/s" if "gbs" in r else f"{r['tflops']:.1f} TF/s"
        by_backend = r.get("ms_by_backend", {next(iter(impls)): r["ms"]})
        times = " | ".join(f"{by_backend[b]:.3f}" if b in by_backend else "" for b in impls)
        print(f"| {r['layer']} | {r['op']} | {size_cell} | {times} | {rate} | {r['floor_ms']:.3f} | "
              f"{r['of_floor']:.0%} |")
    fused = [r for r in rows if "mbytes" in r]
    floor = sum(r["floor_ms"] for r in fused)
    for backend in impls:
        total = sum(r["ms_by_backend"][backend] for r in fused)
        print(f"\nfused ops in {backend}, one call of each per layer: {total:.2f} ms against a floor of {floor:.2f} "
              f"ms ({floor / total:.0%})")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 1)
    size = args.size or (256 if device.type == "cuda" else 64)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs(device, args.reps)
    peak = matmul_peak_tflops(device, dtype)
    tf32 = peak_in_tf32(device, dtype) if device.type == "cuda" and dtype == torch.float32 else None
    impls = implementations(device)
    rows = measure_rows(impls, batch, size, dtype, device, args.reps, bandwidth, peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, fused ops timed in: {', '.join(impls)} (the model uses "
          f"{ops.backend_for(device)}), batch {batch} x 3 x {size} x {size}, {args.dtype}, channels_last; copy "
          f"bandwidth {bandwidth:.0f} GB/s, matmul {peak:.1f} TF/s{PEAK_PRECISION[tf32]}\n")
    print_table(rows, impls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, batch=batch, size=size, dtype=args.dtype,
                           bandwidth_gbs=bandwidth, matmul_tflops=peak, matmul_tf32=tf32, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
