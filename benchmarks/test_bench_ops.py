"""Each fused CPU op (torch.ops.fastunet.*) against the ATen ops it replaces in the seed U-Net, per dtype (float32,
bfloat16, float16) and layout (NCHW, channels_last), at two U-Net layer shapes (2 x 64 x 128 x 128, 2 x 256 x 32 x
32), plain blocks (upscale 1). One group per op, dtype, layout and shape, so that a table reads fastunet vs ATen row
by row.

ATen sequences (what the seed's nn.BatchNorm2d + ReLU + max-pool run):
  bn_stats            torch.var_mean over (N, H, W)
  bn_relu_pool        F.batch_norm (eval: z * scale + shift) + relu_ + max_pool2d (with indices, as autograd keeps
                      them)
  relu_pool_backward  max_pool2d_with_indices_backward + add + threshold_backward; fastunet's op with scale 1 and
                      shift 0, as exact mode calls it on ATen's BN output (its one use)
  bn_relu_backward    the ReLU/pool backward above, then native_batch_norm_backward (training statistics: the
                      per-channel sums and the input gradient in one op); fastunet's bn_relu_backward_reduce then
                      bn_relu_backward_apply, the pair that replaces them (neither has an ATen op of its own)
The fastunet rows take the same inputs; outputs are freshly allocated in both (bn_relu_pool writes into a
preallocated buffer, as in the U-Net's concat buffer).
"""

import pytest
import torch
import torch.nn.functional as F

from fastunet import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"compiled ops not built: {_ext.load_error}")
LIB = torch.ops.fastunet
aten = torch.ops.aten

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SHAPES = [(2, 64, 128, 128), (2, 256, 32, 32)]
OPS = ["bn_stats", "bn_relu_pool", "relu_pool_backward", "bn_relu_backward"]
ROUNDS, WARMUP_ROUNDS = 30, 3


def make_inputs(shape, dtype, memory_format):
    """Random conv output z, gradients of the BN+ReLU output and of the pooled output, per-channel vectors
    (float32), and what ATen's forward saved: the activations y and the max-pool indices."""
    n, c, h, w = shape
    z = (torch.randn(shape) * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    grad_pooled = torch.randn(n, c, h // 2, w // 2).to(dtype).contiguous(memory_format=memory_format)
    scale, shift, mean = torch.randn(c), torch.randn(c), torch.randn(c)
    invstd = torch.rand(c) + 0.5
    y = torch.relu(F.batch_norm(z, torch.zeros(c), torch.ones(c), scale, shift, False, 0.0, 0.0))
    _, indices = F.max_pool2d(y, 2, 2, return_indices=True)
    return dict(z=z, grad=grad, grad_pooled=grad_pooled, scale=scale, shift=shift, mean=mean, invstd=invstd, y=y,
                indices=indices)


def aten_dy(a):
    """The gradient reaching the pre-ReLU values, as autograd runs the ReLU and max-pool backward."""
    g = aten.max_pool2d_with_indices_backward(a["grad_pooled"], a["y"], [2, 2], [2, 2], [0, 0], [1, 1], False,
                                              a["indices"])
    return aten.threshold_backward(a["grad"] + g, a["y"], 0)


def aten_step(op, a):
    z = a["z"]
    if op == "bn_stats":
        return lambda: torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    if op == "bn_relu_pool":
        c = z.shape[1]
        zeros, ones = torch.zeros(c), torch.ones(c)

        def forward():
            y = torch.relu_(F.batch_norm(z, zeros, ones, a["scale"], a["shift"], False, 0.0, 0.0))
            return y, F.max_pool2d(y, 2, 2, return_indices=True)

        return forward
    if op == "relu_pool_backward":
        return lambda: aten_dy(a)
    weight, mean, invstd = a["scale"], a["mean"], a["invstd"]
    return lambda: aten.native_batch_norm_backward(aten_dy(a), z, weight, None, None, mean, invstd, True, 1e-5,
                                                   [True, True, True])


def fastunet_step(op, a):
    z, grad, grad_pooled = a["z"], a["grad"], a["grad_pooled"]
    vectors = (a["scale"], a["shift"])
    if op == "bn_stats":
        return lambda: LIB.bn_stats(z, 1)
    if op == "bn_relu_pool":
        out, pooled = torch.empty_like(grad), torch.empty_like(grad_pooled)
        return lambda: LIB.bn_relu_pool(z, *vectors, 1, out, pooled)
    if op == "relu_pool_backward":
        unit = (torch.ones_like(a["scale"]), torch.zeros_like(a["shift"]))
        return lambda: LIB.relu_pool_backward(grad, grad_pooled, z, *unit, 1)
    mean, invstd = a["mean"], a["invstd"]

    def backward():
        sums = LIB.bn_relu_backward_reduce(grad, grad_pooled, z, *vectors, mean, 1)
        return sums, LIB.bn_relu_backward_apply(grad, grad_pooled, z, *vectors, mean, invstd, *sums, 1)

    return backward


@pytest.mark.parametrize("impl", ["aten", "fastunet"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_fused_op(benchmark, op, dtype, layout, shape, impl):
    torch.manual_seed(0)
    a = make_inputs(shape, DTYPES[dtype], LAYOUTS[layout])
    step = (aten_step if impl == "aten" else fastunet_step)(op, a)
    benchmark.group = f"{op}, {dtype}, {layout}, {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(op=op, dtype=dtype, layout=layout, shape=list(shape), impl=impl)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
