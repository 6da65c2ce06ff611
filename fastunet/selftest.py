"""``python -m fastunet.selftest``: fastunet checked on the device present (CUDA if any, else the CPU): the first
thing to run on a new machine or GPU.

Every fused op of ``fastunet.ops.FUSED_OPS``, called through the dispatcher (the kernel registered for the device
serves it), against its specification ``<op>_ref``: float32, bfloat16 and float16; NCHW, channels_last and a
channel slice of a concat buffer; odd sizes, upscale 1 and 2, with and without the max-pool; outputs poisoned with
NaN so that an unwritten element shows. On CUDA once per kernel set this install serves (Triton, compiled CUDA).
Then the whole model against the seed U-Net, in a training step and in eval: exact mode bit for bit (on CUDA
under deterministic cuDNN, as exact mode promises), fast mode within 2x of the seed's float32 error against a
float64 run. One row per op and case: pass or FAIL, max error, the kernel that served it; exit status 1 on any
failure. Under a minute on a GPU, and on a 2-core CPU.
"""

import argparse
import contextlib
import copy
import sys
from typing import NamedTuple

import torch

from . import U_Net, _ext, ops, reference
from .testing import bn_cancelled_biases, parameter_grads, relative_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("nchw", "channels_last", "channel_slice")
# (upscale, pool, low-res H, W): odd sizes without the max-pool; with it, even logical outputs (sub-pixel: 6 x 10).
GEOMETRIES = ((1, False, 5, 7), (1, True, 6, 8), (2, True, 3, 5), (2, False, 5, 3))
# Results computed in another order than the specification (sums; the BN backward formula rounded to its dtype).
SUM_TOL = 1e-5
APPLY_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
FAST_SLACK = 1e-6  # fast mode: error <= 2 x the seed's error + this


class Row(NamedTuple):
    """One line of the report."""

    what: str
    case: str
    ok: bool
    error: float
    kernel: str

    def __str__(self):
        return f"{self.what:<26} {self.case:<44} {'pass' if self.ok else 'FAIL':<5} {self.error:9.2e}  {self.kernel}"


def arrange(t, layout):
    """``t`` laid out as ``layout``; a channel slice sits between NaN channels of a wider buffer."""
    if layout != "channel_slice":
        return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    n, c, h, w = t.shape
    buf = torch.full((n, c + 5, h, w), float("nan"), dtype=t.dtype, device=t.device)
    buf[:, 2 : 2 + c] = t
    return buf[:, 2 : 2 + c]


def compare(got, want, tol):
    """(within ``tol`` relative and absolute, NaN where the specification has NaN; max |got - want|)."""
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    diff = torch.where(both_nan, 0.0, (got - want).abs())
    ok = not diff.isnan().any() and bool((diff <= tol * (1 + want.abs().nan_to_num())).all())
    return ok, diff.nan_to_num(float("inf")).max().item() if diff.numel() else 0.0


def written(out, want):
    """``out`` equals ``want`` bit for bit (NaN for NaN), and a channel slice's neighbours are still NaN."""
    ok, error = compare(out, want, 0.0)
    base = out._base
    if base is not None and base.dim() == 4:
        c = out.shape[1]
        ok = ok and bool(base[:, :2].isnan().all() and base[:, 2 + c :].isnan().all())
    return ok, error


def op_rows(device, dtype, layout, geometry, kernel):
    """One Row per fused op on one case: inputs drawn fresh, each op against its reference."""
    upscale, pool, h, w = geometry
    n, c, s = 2, 6, upscale
    acc = ops.acc_dtype(dtype)
    draw = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    z = arrange((draw(n, s * s * c, h + s - 1, w + s - 1) * 2 + 0.5).to(dtype), layout)
    scale, shift = draw(c).to(acc) * 1.5, draw(c).to(acc) * 0.5
    out_shape = (n, c, s * h, s * w)
    grad = arrange(draw(*out_shape).to(dtype), layout)
    grad_pooled = arrange(draw(n, c, s * h // 2, s * w // 2).to(dtype), layout) if pool else None
    mean, var = ops.bn_stats_ref(z, upscale)
    invstd = torch.rsqrt(var + 1e-5)
    sums = ops.bn_relu_backward_reduce_ref(grad, grad_pooled, z, scale, shift, mean, upscale)
    backward = (grad, grad_pooled, z, scale, shift)
    results = {}

    out = arrange(torch.full(out_shape, float("nan"), dtype=dtype, device=device), layout)
    pooled = torch.full((n, c, s * h // 2, s * w // 2), float("nan"), dtype=dtype, device=device) if pool else None
    ops.bn_relu_pool(z, scale, shift, upscale, out, pooled)
    want_out, want_pooled = torch.empty(out_shape, dtype=dtype, device=device), None
    want_pooled = torch.empty_like(pooled) if pool else None
    ops.bn_relu_pool_ref(z, scale, shift, upscale, want_out, want_pooled)
    ok, error = written(out, want_out)
    if pool:
        ok_pool, error_pool = written(pooled, want_pooled)
        ok, error = ok and ok_pool, max(error, error_pool)
    results["bn_relu_pool"] = ok, error
    results["bn_stats"] = combined(compare(g, r, SUM_TOL) for g, r in zip(ops.bn_stats(z, upscale), (mean, var)))
    results["relu_pool_backward"] = written(ops.relu_pool_backward(*backward, upscale),
                                            ops.relu_pool_backward_ref(*backward, upscale))
    results["bn_relu_backward_reduce"] = combined(
        compare(g, r, SUM_TOL) for g, r in zip(ops.bn_relu_backward_reduce(*backward, mean, upscale), sums))
    results["bn_relu_backward_apply"] = compare(
        ops.bn_relu_backward_apply(*backward, mean, invstd, *sums, upscale),
        ops.bn_relu_backward_apply_ref(*backward, mean, invstd, *sums, upscale), APPLY_TOL[dtype])
    case = f"{str(dtype)[6:]} {layout} up{upscale}{' pool' if pool else ''} {s * h}x{s * w}"
    return [Row(name, case, *results[name], kernel) for name in ops.FUSED_OPS]


def combined(checks):
    checks = list(checks)
    return all(ok for ok, _ in checks), max(error for _, error in checks)


def kernel_sets(device):
    """The CUDA kernel sets to check on ``device`` (each registered in turn), or [None] off CUDA."""
    if device.type != "cuda":
        return [None]
    sets = ["triton"] if ops._triton_installed() else []
    if _ext.has_cuda_kernels() and _ext.cuda_arch_problem(torch.cuda.get_device_capability(device)) is None:
        sets.append("compiled")
    return sets or ["reference"]


@contextlib.contextmanager
def serving(kernels):
    """``kernels`` registered for CUDA inside the block (nothing off CUDA), the previous choice after."""
    if kernels is None:
        yield
        return
    previous = ops._cuda_kernels
    ops.select_cuda_kernels(kernels)
    try:
        yield
    finally:
        ops.select_cuda_kernels(previous)


def all_op_rows(device):
    rows = []
    for kernels in kernel_sets(device):
        with serving(kernels):
            kernel = ops.backend_for(device)
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    for geometry in GEOMETRIES:
                        rows += op_rows(device, dtype, layout, geometry, kernel)
    return rows


@contextlib.contextmanager
def deterministic_cudnn():
    """cuDNN's deterministic engines, chosen by its heuristics: what exact mode's bit-identity on CUDA needs."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def step(model, x, grad_out):
    """(output, input gradient, parameter gradients, buffers) of a training step, or the eval output."""
    x = x.clone().requires_grad_(model.training)
    if not model.training:
        with torch.no_grad():
            return (model(x),)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, parameter_grads(model), {k: b.clone() for k, b in model.named_buffers()}


def flat(result):
    """The tensors of a step's result, by name."""
    named = {"output": result[0]}
    if len(result) > 1:
        named["input grad"] = result[1]
        named.update({f"grad {k}": g for k, g in result[2].items()})
        named.update({f"buffer {k}": b for k, b in result[3].items()})
    return named


def model_rows(device):
    """Exact mode bit for bit and fast mode within the 2x rule against the seed U-Net, training and eval."""
    size, batch = (64, 4) if device.type == "cuda" else (32, 2)
    generator = torch.Generator().manual_seed(0)
    seed = reference.U_Net(3, 2)
    with torch.no_grad():  # BN shifts away from 0: no ReLU mask flips between float32 and float64
        for bn in (m for m in seed.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.bias.copy_(2.5 + 0.5 * torch.rand(bn.num_features, generator=generator))
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    grad_out = torch.randn(batch, 2, size, size, generator=generator).to(device)
    kernel = f"{ops.backend_for(device)}, second conv {ops.conv3x3_mode()}"
    rows = []
    for mode in ("train", "eval"):
        ref = copy.deepcopy(seed).to(device).train(mode == "train")
        for exact in (True, False):
            model = U_Net(3, 2, exact=exact).to(device).train(mode == "train")
            model.load_state_dict(seed.state_dict())
            with deterministic_cudnn() if exact else contextlib.nullcontext():
                got, want = flat(step(model, x, grad_out)), flat(step(copy.deepcopy(ref), x, grad_out))
            if exact:
                ok = all(torch.equal(got[k], want[k]) for k in want)
                error = max((got[k].double() - want[k].double()).abs().max().item() for k in want if want[k].numel())
            else:
                ref64 = copy.deepcopy(ref).double()
                truth = flat(step(ref64, x.double(), grad_out.double()))
                skip = {f"grad {k}" for k in bn_cancelled_biases(ref64)} | {k for k in truth if "num_batches" in k}
                ratios = [(relative_error(got[k], truth[k]), relative_error(want[k], truth[k])) for k in truth
                          if k not in skip]
                ok = all(g <= 2 * r + FAST_SLACK for g, r in ratios)
                error = max(g for g, _ in ratios)
            rows.append(Row(f"U_Net {'exact' if exact else 'fast'} {mode}",
                            f"float32 {batch}x3x{size}x{size}: " + ("bits = seed U-Net's" if exact else
                                                                    "f64 error <= 2x seed's"),
                            ok, error, kernel))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="default: cuda if a GPU is present, else cpu")
    parser.add_argument("--ops-only", action="store_true", help="the fused ops alone, not the whole model")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fastunet self-test on {device} ({name}), torch {torch.__version__}")
    print(f"{'op / model':<26} {'case':<44} {'':<5} {'max error':>9}  kernel")
    torch.manual_seed(0)
    rows = []
    for row in all_op_rows(device) + ([] if args.ops_only else model_rows(device)):
        print(row, flush=True)
        rows.append(row)
    failed = [row for row in rows if not row.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} passed" + (f"; FAILED: {len(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
