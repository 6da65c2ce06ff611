"""conv3x3_bn_relu_stats: a double block's second 3x3 convolution with the first layer's BN-apply + ReLU
folded into its input load and the second layer's BN statistics gathered in its epilogue.

Implicit GEMM over channels_last tensors: the output rows are the N*H*W pixels, the reduction runs over the
nine taps times the input channels, and the weight is read as a ``[9*Cin, Cout]`` matrix. The input tile is
``a = relu(x*scale + shift)``, computed in float32, rounded to x's dtype (as the unfused path stores the
activation) and 0 in the zero padding: the activation of layer 1 is never written to memory. The epilogue
stores the conv output and, per tile of rows, the mean and the sum of squared deviations of each output
channel (of the values as stored); a second kernel merges them with Chan et al.'s pairwise formula, in parallel:
each program merges a group of up to ``fan_in`` tiles as a tree (``tl.reduce``), and the groups are merged again
the same way until one is left (log_fan_in(tiles) launches). No atomics, a tree fixed by the shapes:
deterministic.

float32 products follow torch's switch for convolutions: TF32 where ATen's float32 convs run in TF32 (cuDNN's conv
precision, ``torch.backends.cudnn.conv.fp32_precision`` or the legacy ``torch.backends.cudnn.allow_tf32``: this
conv stands in for a cuDNN conv, so it obeys the conv switch, not the matmul one), true float32 ("ieee") otherwise.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import cudnn_conv_tf32, launch_device
from .utils import acc_dtype, bn_relu


@triton.jit
def _conv_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, z_ptr, partial_ptr, H, W, Cin, Cout, M, m_tiles,
                 x_sn, x_sc, x_sh, x_sw, z_sn, z_sc, z_sh, z_sw, STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    n = rows // (H * W)
    h = rows % (H * W) // W
    w = rows % W
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Cout
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for tap in range(9):
        hi = h + (tap // 3 - 1)
        wi = w + (tap % 3 - 1)
        inside = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        base = n * x_sn + hi * x_sh + wi * x_sw
        for k_start in range(0, Cin, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = ks < Cin
            load_ok = inside[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + base[:, None] + ks[None, :].to(tl.int64) * x_sc, mask=load_ok, other=0)
            scale = tl.load(scale_ptr + ks, mask=k_ok, other=0)
            shift = tl.load(shift_ptr + ks, mask=k_ok, other=0)
            a = bn_relu(x.to(tl.float32), scale[None, :], shift[None, :])
            a = tl.where(load_ok, a, 0.0).to(x_ptr.dtype.element_ty)
            w_rows = (tap * Cin + ks).to(tl.int64)
            weight = tl.load(w_ptr + w_rows[:, None] * Cout + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                             other=0)
            acc += tl.dot(a, weight, input_precision=INPUT_PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    z = acc.to(z_ptr.dtype.element_ty)
    offsets = (n * z_sn + h * z_sh + w * z_sw)[:, None] + cols[None, :].to(tl.int64) * z_sc
    tl.store(z_ptr + offsets, z, mask=out_ok)
    if STATS:
        stored = tl.where(out_ok, z.to(tl.float32), 0.0)
        count = tl.sum(row_ok.to(tl.float32), axis=0)
        mean = tl.sum(stored, axis=0) / count
        deviation = tl.where(out_ok, stored - mean[None, :], 0.0)
        tl.store(partial_ptr + pid_m * Cout + cols, mean, mask=col_ok)
        tl.store(partial_ptr + (m_tiles + pid_m) * Cout + cols, tl.sum(deviation * deviation, axis=0), mask=col_ok)


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s merge of two parts' (count, mean, sum of squared deviations); an empty part (count 0) leaves
    the other as it is."""
    count = count_a + count_b
    share_b = tl.where(count > 0, count_b / count, 0.0)
    delta = mean_b - mean_a
    return count, mean_a + delta * share_b, m2_a + m2_b + delta * delta * (count_a * share_b)


@triton.jit
def _merge_stats_kernel(partial_ptr, merged_ptr, mean_ptr, var_ptr, Cout, M, parts, span, FINAL: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (g, c) merges parts [g*BLOCK_P, (g+1)*BLOCK_P) of partial ``[2, parts, Cout]`` (mean, m2 of the
    rows [p*span, (p+1)*span) of M, the last part shorter) for BLOCK_C channels: into part g of merged
    ``[2, groups, Cout]``, or (FINAL, one group) into mean and var."""
    group = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    part = (group * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    part_ok = part < parts
    ok = part_ok[:, None] & (channels < Cout)[None, :]
    offsets = part[:, None] * Cout + channels[None, :]
    mean = tl.load(partial_ptr + offsets, mask=ok, other=0)
    m2 = tl.load(partial_ptr + parts * Cout + offsets, mask=ok, other=0)
    rows = tl.where(part_ok, tl.minimum(span, M - part * span), 0).to(tl.float32)
    count = tl.broadcast_to(rows[:, None], (BLOCK_P, BLOCK_C))
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    channel_ok = channels < Cout
    if FINAL:
        tl.store(mean_ptr + channels, mean, mask=channel_ok)
        tl.store(var_ptr + channels, m2 / count, mask=channel_ok)
    else:
        groups = tl.num_programs(0)
        tl.store(merged_ptr + group * Cout + channels, mean, mask=channel_ok)
        tl.store(merged_ptr + (groups + group) * Cout + channels, m2, mask=channel_ok)


class MergePlan(NamedTuple):
    """The tree that merges the conv's per-tile statistics: each launch merges groups of up to ``fan_in`` parts of
    ``block_c`` channels."""

    fan_in: int
    block_c: int


def _merge_plan(device):
    return MergePlan(64, 32) if device.type == "cuda" else MergePlan(4, 16)


def _merge_stats(partial, m, tile_rows, mean, var):
    """Merges the per-tile ``partial`` ``[2, tiles, Cout]`` of M rows (``tile_rows`` a tile) into mean and var."""
    plan = _merge_plan(partial.device)
    parts, span, cout = partial.shape[1], tile_rows, partial.shape[2]
    while True:
        groups = triton.cdiv(parts, plan.fan_in)
        merged = partial if groups == 1 else partial.new_empty((2, groups, cout))
        wrap_triton(_merge_stats_kernel)[(groups, triton.cdiv(cout, plan.block_c))](
            partial, merged, mean, var, cout, m, parts, span, FINAL=groups == 1, BLOCK_P=plan.fan_in,
            BLOCK_C=plan.block_c,
        )
        if groups == 1:
            return
        partial, parts, span = merged, groups, span * plan.fan_in


def input_precision(dtype):
    """tl.dot's input_precision for the conv in ``dtype``: float32 in TF32 exactly where ATen's float32 convs on
    CUDA are (cudnn_conv_tf32), else "ieee"; half-precision inputs multiply exactly either way."""
    return "tf32" if dtype != torch.float32 or cudnn_conv_tf32() else "ieee"


def _blocks(device):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the implicit GEMM."""
    return (128, 64, 32) if device.type == "cuda" else (32, 16, 16)


@triton_op("fastunet::conv3x3_bn_relu_stats", mutates_args=())
def conv3x3_bn_relu_stats(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                          stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z = conv3x3(relu(x*scale + shift), weight)`` (padding 1, no bias) and, if ``stats``, the per-channel
    batch mean and biased variance of z as stored.

    x: ``[N, Cin, H, W]`` float32/bfloat16/float16, any strides (channels_last reads best); scale, shift:
    ``[Cin]`` float32; weight: ``[Cout, Cin, 3, 3]`` of x's dtype. Returns z ``[N, Cout, H, W]``
    (channels_last, x's dtype) and mean, var ``[Cout]`` float32 (empty without ``stats``).
    """
    torch._check(x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[1:]) == (x.shape[1], 3, 3),
                 lambda: f"fastunet: conv3x3 of x {tuple(x.shape)} with weight {tuple(weight.shape)}")
    torch._check(x.dtype == weight.dtype and x.dtype != torch.float64,
                 lambda: f"fastunet: conv3x3 takes float32/bfloat16/float16 x and weight of one dtype, got "
                         f"{x.dtype} and {weight.dtype}")
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    m = n * h * w
    block_m, block_n, block_k = _blocks(x.device)
    m_tiles = triton.cdiv(m, block_m)
    z = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    partial = torch.empty((2, m_tiles if stats else 1, cout), dtype=acc_dtype(x.dtype), device=x.device)
    matrix = weight.permute(2, 3, 1, 0).reshape(9 * cin, cout).contiguous()
    mean = torch.empty(cout if stats else 0, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    with launch_device(x):
        wrap_triton(_conv_kernel)[(m_tiles, triton.cdiv(cout, block_n))](
            x, scale, shift, matrix, z, partial, h, w, cin, cout, m, m_tiles, *x.stride(), *z.stride(),
            STATS=stats, INPUT_PRECISION=input_precision(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
        if stats:
            _merge_stats(partial, m, block_m, mean, var)
    return z, mean, var


def conv3x3_bn_relu_stats_ref(x, scale, shift, weight, stats):
    """The specification: the unfused path (activation stored in x's dtype, then the conv, then the stats)."""
    a = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
    z = torch.nn.functional.conv2d(a, weight, padding=1).contiguous(memory_format=torch.channels_last)
    if not stats:
        empty = torch.empty(0, device=x.device)
        return z, empty, empty
    var, mean = torch.var_mean(z.float(), dim=(0, 2, 3), correction=0)
    return z, mean, var
