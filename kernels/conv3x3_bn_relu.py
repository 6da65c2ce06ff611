"""conv3x3_bn_relu_stats: a double block's second 3x3 convolution with the first layer's BN-apply + ReLU
folded into its input load and the second layer's BN statistics gathered in its epilogue.

Implicit GEMM over channels_last tensors: the output rows are the N*H*W pixels, the reduction runs over the
nine taps times the input channels, and the weight is read as a ``[9*Cin, Cout]`` matrix. The input tile is
``a = relu(x*scale + shift)``, computed in float32, rounded to x's dtype (as the unfused path stores the
activation) and 0 in the zero padding: the activation of layer 1 is never written to memory. The epilogue
stores the conv output and, per tile of rows, the mean and the sum of squared deviations of each output
channel (of the values as stored); a second kernel merges the tiles with Chan et al.'s pairwise formula. No
atomics: deterministic.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .utils import acc_dtype, bn_relu

_BLOCK_C = 64


@triton.jit
def _conv_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, z_ptr, partial_ptr, H, W, Cin, Cout, M, m_tiles,
                 x_sn, x_sc, x_sh, x_sw, z_sn, z_sc, z_sh, z_sw, STATS: tl.constexpr,
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
            acc += tl.dot(a, weight)
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
def _merge_stats_kernel(partial_ptr, mean_ptr, var_ptr, Cout, M, m_tiles, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = channels < Cout
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(m_tiles):
        tile_count = tl.minimum(BLOCK_M, M - tile * BLOCK_M).to(tl.float32)
        tile_mean = tl.load(partial_ptr + tile * Cout + channels, mask=ok, other=0)
        tile_m2 = tl.load(partial_ptr + (m_tiles + tile) * Cout + channels, mask=ok, other=0)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    tl.store(mean_ptr + channels, mean, mask=ok)
    tl.store(var_ptr + channels, m2 / count, mask=ok)


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
    wrap_triton(_conv_kernel)[(m_tiles, triton.cdiv(cout, block_n))](
        x, scale, shift, matrix, z, partial, h, w, cin, cout, m, m_tiles, *x.stride(), *z.stride(),
        STATS=stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    mean = torch.empty(cout if stats else 0, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    if stats:
        wrap_triton(_merge_stats_kernel)[(triton.cdiv(cout, _BLOCK_C),)](
            partial, mean, var, cout, m, m_tiles, BLOCK_M=block_m, BLOCK_C=_BLOCK_C,
        )
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
