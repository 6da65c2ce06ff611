"""The Triton kernels (fastunet.kernels) against the pure-PyTorch references ``<op>_ref`` in fastunet/ops.py.

Without a GPU they run on the CPU under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so
shapes stay small. Outputs start as a sentinel no op can produce, and concat-buffer slices sit between
sentinel channels: every element that should be written is checked, and nothing else may change.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_GPU, requires_cuda

pytest.importorskip("triton")

from fastunet import kernels, ops  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no CUDA GPU and TRITON_INTERPRET is not 1")

DEVICE = "cuda" if HAS_GPU else "cpu"
SENTINEL = -7.0  # never a ReLU output, nor (almost surely) a gradient of the random test data
SLICE_AT, SPARE = 2, 3  # a channel slice starts at SLICE_AT of a buffer with SPARE more channels
# Channel slices of NCHW and of channels_last concat buffers, besides the two dense layouts. The interpreter runs
# the same code on any strides (no specialization on unit or aligned strides, as the GPU JIT makes), so there the
# slices, whose strides generalize the dense ones', cover the dense layouts too.
SLICES = ["nchw_slice", "channels_last_slice"]
LAYOUTS = ["nchw", "channels_last", *SLICES] if HAS_GPU else SLICES
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(
        torch.bfloat16,
        id="bfloat16",
        marks=pytest.mark.skipif(not HAS_GPU, reason="bfloat16 needs a GPU: Triton's interpreter has no bf16 math"),
    ),
]
# Tolerances of results computed in another order than the reference (sums, the BN backward formula).
SUM_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12)}
SUM_TOL_FLOAT32 = dict(rtol=1e-5, atol=1e-5)
OUT_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def arrange(t, layout):
    """``t`` laid out as ``layout``: a slice sits among sentinel channels of a bigger buffer."""
    memory_format = torch.channels_last if layout.startswith("channels_last") else torch.contiguous_format
    if not layout.endswith("_slice"):
        return t.contiguous(memory_format=memory_format)
    n, c, h, w = t.shape
    buf = torch.full((n, c + SPARE, h, w), SENTINEL, dtype=t.dtype, device=t.device)
    buf = buf.contiguous(memory_format=memory_format)
    buf[:, SLICE_AT : SLICE_AT + c] = t
    return buf[:, SLICE_AT : SLICE_AT + c]


def poisoned(shape, dtype, layout):
    """An output of ``shape`` laid out as ``layout``, all SENTINEL."""
    return arrange(torch.full(shape, SENTINEL, dtype=dtype, device=DEVICE), layout)


def buffer_of(t):
    """The whole concat buffer behind a channel slice (``t`` itself otherwise)."""
    if t._base is None:
        return t
    return t._base


def assert_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_written(out, expected):
    """``out`` equals ``expected`` exactly, and the rest of its buffer still holds the sentinel."""
    assert_exact(out, expected)
    buf = buffer_of(out)
    if buf is not out:
        rest = torch.cat([buf[:, :SLICE_AT], buf[:, SLICE_AT + out.shape[1] :]], dim=1)
        assert bool((rest == SENTINEL).all()), "wrote outside the channel slice"


def sum_tol(dtype):
    return SUM_TOL.get(dtype, SUM_TOL_FLOAT32)


def random_z(shape, dtype, layout, *, nans=False):
    """Conv-output-like data, half of it small integers (ties in the pool windows); ``nans`` puts a NaN in
    about 1 element in 30."""
    z = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    quantised = torch.randint(0, 3, shape, device=DEVICE).to(torch.float64)
    z = torch.where(torch.rand(shape, device=DEVICE) < 0.5, quantised, z)
    if nans:
        z = torch.where(torch.rand(shape, device=DEVICE) < 1 / 30, float("nan"), z)
    return arrange(z.to(dtype), layout)


class Case:
    """Inputs of one op call: conv output z for ``upscale``, per-channel scale and shift, and gradients."""

    def __init__(self, upscale, layout, dtype, *, pool, nans=False, batch=2, channels=5, hw=None):
        s = self.upscale = upscale
        h, w = hw or ((3, 5) if s == 2 else (4, 6) if pool else (5, 7))  # odd sizes where there is no max-pool
        self.z = random_z((batch, s * s * channels, h + s - 1, w + s - 1), dtype, layout, nans=nans)
        acc = ops.acc_dtype(dtype)
        self.scale = torch.randn(channels, dtype=acc, device=DEVICE) * 1.5
        self.shift = torch.randn(channels, dtype=acc, device=DEVICE) * 0.5
        self.out_shape = (batch, channels, s * h, s * w)
        self.pooled_shape = (batch, channels, s * h // 2, s * w // 2)
        self.grad = arrange(torch.randn(self.out_shape, device=DEVICE).to(dtype), layout)
        self.grad_pooled = arrange(torch.randn(self.pooled_shape, device=DEVICE).to(dtype), layout) if pool else None

    def backward_args(self):
        return self.grad, self.grad_pooled, self.z, self.scale, self.shift

    def bn_args(self):
        """mean, invstd, sum_dy, sum_dy_xmu as a training step would pass them."""
        mean, var = ops.bn_stats_ref(self.z, self.upscale)
        sum_dy, sum_dy_xmu = ops.bn_relu_backward_reduce_ref(*self.backward_args(), mean, self.upscale)
        return mean, torch.rsqrt(var + 1e-5), sum_dy, sum_dy_xmu


def poisoned_empty_like(monkeypatch):
    """Makes torch.empty_like return SENTINEL-filled tensors, so that unwritten elements show."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(SENTINEL))


dtypes = pytest.mark.parametrize("dtype", DTYPES)
layouts = pytest.mark.parametrize("layout", LAYOUTS)
upscales = pytest.mark.parametrize("upscale", [1, 2])
pools = pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])


@dtypes
@layouts
@pools
@upscales
def test_bn_relu_pool_matches_reference_bit_for_bit(upscale, pool, layout, dtype):
    case = Case(upscale, layout, dtype, pool=pool, nans=True)
    out = poisoned(case.out_shape, dtype, layout)
    pooled = poisoned(case.pooled_shape, dtype, layout) if pool else None
    expected_out = torch.empty(case.out_shape, dtype=dtype, device=DEVICE)
    expected_pooled = torch.empty(case.pooled_shape, dtype=dtype, device=DEVICE) if pool else None
    ops.bn_relu_pool_ref(case.z, case.scale, case.shift, upscale, expected_out, expected_pooled)

    kernels.bn_relu_pool(case.z, case.scale, case.shift, upscale, out, pooled)

    assert_written(out, expected_out)
    if pool:
        assert_written(pooled, expected_pooled)


@dtypes
@layouts
@pools
@upscales
def test_relu_pool_backward_matches_reference_bit_for_bit(upscale, pool, layout, dtype, monkeypatch):
    case = Case(upscale, layout, dtype, pool=pool, nans=True)
    expected = ops.relu_pool_backward_ref(*case.backward_args(), upscale)
    poisoned_empty_like(monkeypatch)

    dy = kernels.relu_pool_backward(*case.backward_args(), upscale)

    assert_exact(dy, expected)
    if not layout.endswith("_slice"):
        assert dy.stride() == case.z.stride()


@dtypes
@layouts
@upscales
def test_bn_stats_matches_reference(upscale, layout, dtype):
    z = Case(upscale, layout, dtype, pool=False).z
    expected_mean, expected_var = ops.bn_stats_ref(z, upscale)

    mean, var = kernels.bn_stats(z, upscale)

    torch.testing.assert_close(mean, expected_mean, **sum_tol(dtype))
    torch.testing.assert_close(var, expected_var, **sum_tol(dtype))


@upscales
def test_bn_stats_keep_a_nan(upscale):
    """A NaN makes its channel's mean and variance NaN, as in nn.BatchNorm2d; the other channels are unaffected."""
    z = Case(upscale, "channels_last", torch.float32, pool=False).z.clone()
    z[1, upscale * upscale - 1, 2, 1] = float("nan")
    expected_mean, expected_var = ops.bn_stats_ref(z, upscale)

    mean, var = kernels.bn_stats(z, upscale)

    assert expected_var.isnan().sum() == 1
    torch.testing.assert_close(mean, expected_mean, equal_nan=True, **sum_tol(torch.float32))
    torch.testing.assert_close(var, expected_var, equal_nan=True, **sum_tol(torch.float32))


@upscales
def test_bn_stats_is_robust_to_a_large_mean(upscale):
    s = upscale
    shape = (4, s * s * 3, 9 + s - 1, 7 + s - 1)
    # std 0.01 about a mean of 1000: a float32 sum of squares about 0 would lose the variance entirely
    z = arrange((1000.0 + 0.01 * torch.randn(shape, dtype=torch.float64, device=DEVICE)).float(), "channels_last")
    expected_mean, expected_var = ops.bn_stats_ref(z.double(), upscale)

    mean, var = kernels.bn_stats(z, upscale)

    torch.testing.assert_close(mean, expected_mean.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, expected_var.float(), rtol=1e-5, atol=0)


@dtypes
@layouts
@pools
@upscales
def test_bn_relu_backward_reduce_matches_reference(upscale, pool, layout, dtype):
    case = Case(upscale, layout, dtype, pool=pool)
    mean = ops.bn_stats_ref(case.z, upscale)[0]
    expected = ops.bn_relu_backward_reduce_ref(*case.backward_args(), mean, upscale)

    sums = kernels.bn_relu_backward_reduce(*case.backward_args(), mean, upscale)

    torch.testing.assert_close(sums, expected, **sum_tol(dtype))


@dtypes
@layouts
@pools
@upscales
def test_bn_relu_backward_apply_matches_reference(upscale, pool, layout, dtype, monkeypatch):
    case = Case(upscale, layout, dtype, pool=pool)
    bn_args = case.bn_args()
    expected = ops.bn_relu_backward_apply_ref(*case.backward_args(), *bn_args, upscale)
    poisoned_empty_like(monkeypatch)

    dz = kernels.bn_relu_backward_apply(*case.backward_args(), *bn_args, upscale)

    torch.testing.assert_close(dz, expected, **OUT_TOL[dtype])
    if not layout.endswith("_slice"):
        assert dz.stride() == case.z.stride()


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(dict(channels=70), id="70ch"),
        pytest.param(dict(batch=4, channels=160, hw=(16, 24)), id="gpu_sized", marks=requires_cuda),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES[:1] + DTYPES[-1:])
@upscales
def test_all_ops_on_more_channels_than_a_block(upscale, dtype, size, monkeypatch):
    """Full channel blocks and a partial one, reductions split into several chunks (the same bit for bit
    when run again), out a channels_last concat-buffer slice: all five ops against the references."""
    case = Case(upscale, "channels_last", dtype, pool=True, **size)
    mean, invstd, sum_dy, sum_dy_xmu = case.bn_args()
    out = poisoned(case.out_shape, dtype, "channels_last_slice")
    pooled = poisoned(case.pooled_shape, dtype, "channels_last")
    expected_out = torch.empty(case.out_shape, dtype=dtype, device=DEVICE)
    expected_pooled = torch.empty(case.pooled_shape, dtype=dtype, device=DEVICE)
    ops.bn_relu_pool_ref(case.z, case.scale, case.shift, upscale, expected_out, expected_pooled)
    expected_dy = ops.relu_pool_backward_ref(*case.backward_args(), upscale)
    expected_dz = ops.bn_relu_backward_apply_ref(*case.backward_args(), mean, invstd, sum_dy, sum_dy_xmu, upscale)
    pixels = case.out_shape[0] * case.out_shape[2] * case.out_shape[3]
    tolerance = dict(rtol=1e-5, atol=1e-5 * pixels**0.5)  # sums of as many terms, in another order

    stats = kernels.bn_stats(case.z, upscale)
    kernels.bn_relu_pool(case.z, case.scale, case.shift, upscale, out, pooled)
    sums = kernels.bn_relu_backward_reduce(*case.backward_args(), mean, upscale)
    poisoned_empty_like(monkeypatch)
    dy = kernels.relu_pool_backward(*case.backward_args(), upscale)
    dz = kernels.bn_relu_backward_apply(*case.backward_args(), mean, invstd, sum_dy, sum_dy_xmu, upscale)

    torch.testing.assert_close(stats, ops.bn_stats_ref(case.z, upscale), **tolerance)
    assert_written(out, expected_out)
    assert_written(pooled, expected_pooled)
    assert_exact(dy, expected_dy)
    torch.testing.assert_close(sums, (sum_dy, sum_dy_xmu), **tolerance)
    torch.testing.assert_close(dz, expected_dz, **OUT_TOL[dtype])
    assert_exact(kernels.bn_stats(case.z, upscale), stats)
    assert_exact(kernels.bn_relu_backward_reduce(*case.backward_args(), mean, upscale), sums)


@pytest.mark.parametrize("what", ["upscale", "out_shape", "out_dtype", "odd_pool"])
def test_bad_arguments_are_refused(what):
    z = torch.randn(1, 2, 3 if what == "odd_pool" else 4, 4, device=DEVICE)
    scale, shift = torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    out = torch.empty(ops.logical_shape(z, 1), device=DEVICE)
    upscale, pooled = 1, None
    if what == "upscale":
        upscale = 3
    elif what == "out_shape":
        out = out[..., 1:]
    elif what == "out_dtype":
        out = out.double()
    else:
        pooled = torch.empty(1, 2, 1, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="fastunet"):
        kernels.bn_relu_pool(z, scale, shift, upscale, out, pooled)


# Compiles the elementwise kernels for sm_90 in a process without TRITON_INTERPRET (no GPU needed).
_COMPILE_FOR_SM90 = r"""
import importlib
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ACTIVATIONS = ("z_ptr", "out_ptr", "pooled_ptr", "grad_ptr", "grad_pooled_ptr", "dz_ptr", "x_ptr", "w_ptr")


# The kernel's sm_90 PTX. channels_last: specialized as the JIT does on a GPU for channels_last tensors (channel
# strides equal to 1, a constexpr; pointers and other integers divisible by 16).
def ptx(module, kernel, activation, constexprs, channels_last=False):
    fn = getattr(importlib.import_module("fastunet.kernels." + module), kernel)
    vectors = "fp64" if activation == "fp64" else "fp32"
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif channels_last and name.endswith("_sc"):
            signature[name], constexprs[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = "*" + (activation if name in ACTIVATIONS else vectors)
        else:
            signature[name] = "i32" if channels_last else "i64"
        if channels_last and signature[name] != "constexpr":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


for activation in ("fp32", "fp64", "bf16"):
    width = activation[2:] if activation == "fp64" else "32"
    tile = dict(S=2, POOL=True, BLOCK_V=8, BLOCK_C=64)
    for text in (
        ptx("bn_relu_pool", "_bn_relu_pool_kernel", activation, tile),
        ptx("bn_relu_backward", "_backward_z_kernel", activation, dict(tile, APPLY_BN=False)),
    ):
        assert "mul.rn.f" + width in text and "fma.rn.f" + width not in text, activation

# Specialized for channels_last, the kernels move bf16 activations in 8- and 16-byte accesses.
for upscale, pool in ((1, True), (2, False)):
    tile = dict(S=upscale, POOL=pool, BLOCK_V=8, BLOCK_C=64)
    for text in (ptx("bn_relu_pool", "_bn_relu_pool_kernel", "bf16", tile, channels_last=True),
                 ptx("bn_relu_backward", "_backward_z_kernel", "bf16", dict(tile, APPLY_BN=True), channels_last=True)):
        assert "ld.global.v4.b32" in text and "st.global.v4.b32" in text, (upscale, pool)
        assert not re.search(r"(ld|st)\.global\.(b16|u16)", text), (upscale, pool)
    for text in (ptx("bn_stats", "_bn_stats_partial_kernel", "bf16", dict(S=upscale, BLOCK_V=8, BLOCK_C=64),
                     channels_last=True),
                 ptx("bn_relu_backward", "_backward_reduce_partial_kernel", "bf16", tile, channels_last=True)):
        assert "ld.global.v4.b32" in text and not re.search(r"ld\.global\.(b16|u16)", text), (upscale, pool)

# The Triton conv: its input load rounds the BN product on its own too, and its GEMM runs on tensor cores; float32
# in TF32 only when asked ("ieee": true float32 products, no TF32 instruction).
conv_tile = dict(STATS=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)
for activation in ("fp32", "bf16"):
    text = ptx("conv3x3_bn_relu", "_conv_kernel", activation, dict(conv_tile, INPUT_PRECISION="tf32"))
    assert "mul.rn.f32" in text and ("wgmma" in text or "mma.sync" in text), activation
    assert ("tf32" in text) == (activation == "fp32"), activation
text = ptx("conv3x3_bn_relu", "_conv_kernel", "fp32", dict(conv_tile, INPUT_PRECISION="ieee"))
assert "tf32" not in text and "wgmma" not in text and "mma.sync" not in text
# Its statistics' tree merge (tl.reduce over a tuple, which the interpreter runs as a loop) compiles for the GPU.
for final in (False, True):
    assert "st.global" in ptx("conv3x3_bn_relu", "_merge_stats_kernel", "fp32", dict(FINAL=final, BLOCK_P=64,
                                                                                      BLOCK_C=32))
"""


def test_gpu_code_rounds_the_bn_product_on_its_own():
    """On a GPU, Triton would contract z*scale + shift into an FMA (one rounding) where PyTorch rounds twice;
    the forward and relu_pool_backward kernels must compile to a separate mul.rn for bit equality. Also, compiled
    for sm_90 here without a GPU: the elementwise kernels' 16-byte accesses on channels_last, and the Triton
    conv's tensor-core instructions."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.skipif(not HAS_GPU, reason="the ops' CUDA kernels are the Triton ones: on a CUDA GPU")
@pools
@upscales
def test_ops_trace_under_torch_compile_fullgraph(upscale, pool):
    """The ops through the dispatcher (their CUDA kernels: Triton) under torch.compile(fullgraph=True)."""
    case = Case(upscale, "channels_last", torch.float32, pool=pool)

    def step(z, scale, shift, buf, pooled, grad, grad_pooled):
        mean, var = ops.bn_stats(z, upscale)
        ops.bn_relu_pool(z, scale, shift, upscale, buf[:, SLICE_AT : SLICE_AT + scale.shape[0]], pooled)
        dy = ops.relu_pool_backward(grad, grad_pooled, z, scale, shift, upscale)
        sum_dy, sum_dy_xmu = ops.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)
        invstd = torch.rsqrt(var + 1e-5)
        dz = ops.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu,
                                        upscale)
        return mean, var, dy, sum_dy, sum_dy_xmu, dz

    def run(fn):
        out = poisoned(case.out_shape, torch.float32, "channels_last_slice")
        pooled = poisoned(case.pooled_shape, torch.float32, "nchw") if pool else None
        results = fn(case.z, case.scale, case.shift, buffer_of(out), pooled, case.grad, case.grad_pooled)
        return results, out, pooled

    (mean, var, dy, *rest), out, pooled = run(step)
    (c_mean, c_var, c_dy, *c_rest), c_out, c_pooled = run(torch.compile(step, fullgraph=True))

    assert_written(c_out, out)
    if pool:
        assert_exact(c_pooled, pooled)
    assert_exact(c_dy, dy)
    torch.testing.assert_close((c_mean, c_var, *c_rest), (mean, var, *rest), **SUM_TOL_FLOAT32)


# ----------------------------------------------------------------------------------------------------
# conv3x3_bn_relu_stats: the second conv of a double block with the first BN+ReLU in its input load
# ----------------------------------------------------------------------------------------------------

from fastunet import functional  # noqa: E402
from fastunet.kernels import conv3x3_bn_relu  # noqa: E402
from fastunet.kernels.conv3x3_bn_relu import conv3x3_bn_relu_stats_ref  # noqa: E402

# float32 on a GPU runs TF32 products (as cuDNN convs do by default); the interpreter multiplies in float32.
CONV_TOL = {torch.float32: dict(rtol=2e-3, atol=2e-3) if HAS_GPU else dict(rtol=1e-5, atol=1e-5),
            torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("shape", [(2, 16, 24, 8, 8), (1, 5, 7, 3, 6), (3, 40, 20, 5, 9)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.id != "float64"])
def test_conv3x3_bn_relu_stats_matches_specification(shape, layout, dtype):
    n, cin, cout, h, w = shape
    if not HAS_GPU and cin > 32 and dtype != torch.float32:
        pytest.skip("under the interpreter, several input-channel blocks (the last partial) run in float32 alone: "
                    "their indices do not depend on the dtype, and a case takes 5 s")
    x = arrange(torch.randn(n, cin, h, w, device=DEVICE).to(dtype), layout)
    scale, shift = torch.rand(cin, device=DEVICE) + 0.5, torch.randn(cin, device=DEVICE)
    weight = (0.2 * torch.randn(cout, cin, 3, 3, device=DEVICE)).to(dtype)
    z, mean, var = kernels.conv3x3_bn_relu_stats(x, scale, shift, weight, True)
    want, _, _ = conv3x3_bn_relu_stats_ref(x, scale, shift, weight, False)
    assert z.shape == (n, cout, h, w) and z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, want, **CONV_TOL[dtype])
    # The statistics are those of z as stored, from the epilogue's per-tile partials merged pairwise.
    want_var, want_mean = torch.var_mean(z.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close((mean, var), (want_mean, want_var), **SUM_TOL_FLOAT32)
    again, no_mean, no_var = kernels.conv3x3_bn_relu_stats(x, scale, shift, weight, False)
    assert torch.equal(again, z) and no_mean.numel() == 0 and no_var.numel() == 0


@pytest.mark.parametrize("shape", [(3, 9, 15), (1, 5, 5), (3, 11, 13), (2, 16, 16)], ids=str)
def test_conv_statistics_merge_in_parallel_and_match_the_specification(shape, monkeypatch):
    """The per-tile statistics merge in a tree of launches, each over groups of tiles in parallel (not one program
    walking every tile): an odd tile count, a single tile, two levels with a partial group, an even count. The
    results match bn_stats_ref of z as stored, and bit for bit on a second call."""
    n, h, w = shape
    x = arrange(torch.randn(n, 6, h, w, device=DEVICE), "channels_last")
    scale, shift = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    weight = 0.2 * torch.randn(20, 6, 3, 3, device=DEVICE)
    grids = []
    wrap = conv3x3_bn_relu.wrap_triton

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            if self.kernel is conv3x3_bn_relu._merge_stats_kernel:
                grids.append(grid)
            return wrap(self.kernel)[grid]

    monkeypatch.setattr(conv3x3_bn_relu, "wrap_triton", Recording)
    z, mean, var = kernels.conv3x3_bn_relu_stats(x, scale, shift, weight, True)
    block_m = conv3x3_bn_relu._blocks(x.device)[0]
    plan = conv3x3_bn_relu._merge_plan(x.device)
    groups, want_grids = -(-n * h * w // block_m), []
    while not want_grids or groups > 1:
        groups = -(-groups // plan.fan_in)
        want_grids.append((groups, -(-20 // plan.block_c)))
    assert grids == want_grids and (len(grids) > 1) == (n * h * w > block_m * plan.fan_in)
    want_mean, want_var = ops.bn_stats_ref(z.double(), 1)
    torch.testing.assert_close((mean.double(), var.double()), (want_mean, want_var), rtol=1e-5, atol=1e-6)
    again = kernels.conv3x3_bn_relu_stats(x, scale, shift, weight, True)
    assert torch.equal(again[1], mean) and torch.equal(again[2], var)


@pytest.mark.parametrize("training", [True, False])
def test_double_block_with_the_triton_conv_matches_the_cudnn_path(training, conv_policy):
    """FASTUNET_CONV=triton: the fast double block's output, pool, running stats and every gradient match the
    default path's (a BN+ReLU pass, then ATen's conv) to float32 rounding."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    params = [0.3 * torch.randn(16, 3, 3, 3), torch.randn(16), torch.rand(16) + 0.5, torch.randn(16),
              0.2 * torch.randn(16, 16, 3, 3), torch.randn(16), torch.rand(16) + 0.5, torch.randn(16) + 2]
    grad_buf, grad_pooled = torch.randn(2, 20, 8, 8, device=DEVICE), torch.randn(2, 16, 4, 4, device=DEVICE)

    def run(conv):
        conv_policy(second_conv_mode=conv)
        assert ops.conv3x3_backend(x, params[4]) == conv
        xs = x.clone().requires_grad_()
        ps = [p.to(DEVICE).requires_grad_() for p in params]
        running = [torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE),
                   torch.ones(16, device=DEVICE)]
        factor = 0.1 if training else None
        bn1 = functional.BatchNormArgs(ps[2], ps[3], running[0], running[1], 1e-5, factor, training)
        bn2 = functional.BatchNormArgs(ps[6], ps[7], running[2], running[3], 1e-5, factor, training)
        buf, pooled = functional.double_conv_bn_relu(xs, ps[:2], bn1, ps[4:6], bn2, cat_channels=4, pool=True)
        torch.autograd.backward([buf[:, :16], pooled], [grad_buf[:, :16], grad_pooled])
        return [buf[:, :16].detach(), pooled.detach(), *running, xs.grad, *(p.grad for p in ps)]

    for got, want in zip(run("triton"), run("aten")):
        torch.testing.assert_close(got, want, **CONV_TOL[torch.float32])
