"""The backward ops of BN + ReLU (+ 2x2 max-pool): relu_pool_backward, bn_relu_backward_reduce and
bn_relu_backward_apply.

Each recomputes the ReLU output y from z (rounded to grad's dtype, as the forward stored it), and with a
pooled gradient the max-pool argmax of each 2x2 cell, instead of reading saved activations or indices.
The two ops that write a gradient laid out like z cover z's border too (the cells one past the image on
each side when upscale is 2), writing 0 where no logical pixel reads z. The reduction runs in two steps
without atomics (deterministic): per-chunk partial sums, then a per-channel sum of the chunks.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import (
    bn_backward_dz,
    channel_sum,
    check_activation,
    elementwise_grid,
    geometry,
    load_channels,
    optional_tensor,
    plan_reduction,
    relu_pool_dy,
    store_partial,
    sum_partials,
    tile_channels,
    tile_indices,
    tiles,
    z_mask,
    z_offsets,
)

_PARTIALS = 2  # sum_dy, sum_dy_xmu
_BLOCK_CHUNKS = 32


@triton.jit
def _backward_z_kernel(grad_ptr, grad_pooled_ptr, z_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                       sum_dy_ptr, sum_dy_xmu_ptr, dz_ptr, C, H, W, rows_per_sample, count,
                       g_sn, g_sc, g_sh, g_sw, p_sn, p_sc, p_sh, p_sw, z_sn, z_sc, z_sh, z_sw,
                       d_sn, d_sc, d_sh, d_sw, S: tl.constexpr, POOL: tl.constexpr, APPLY_BN: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    n, u, k, v, c = tile_indices(tl.program_id(0), tl.program_id(1) * BLOCK_V, tl.program_id(2) * BLOCK_C,
                                 rows_per_sample, S - 1, BLOCK_V, BLOCK_C)
    scale = load_channels(scale_ptr, c, C)
    x, dy, mask = relu_pool_dy(grad_ptr, grad_pooled_ptr, z_ptr, scale, load_channels(shift_ptr, c, C),
                               n, u, k, v, c, C, H, W, g_sn, g_sc, g_sh, g_sw, p_sn, p_sc, p_sh, p_sw,
                               z_sn, z_sc, z_sh, z_sw, S, POOL)
    if APPLY_BN:
        dz = bn_backward_dz(dy, x, load_channels(mean_ptr, c, C), load_channels(invstd_ptr, c, C), scale,
                            load_channels(sum_dy_ptr, c, C), load_channels(sum_dy_xmu_ptr, c, C), count)
    else:
        dz = dy
    tl.store(dz_ptr + z_offsets(n, u, k, v, c, C, d_sn, d_sc, d_sh, d_sw, S),
             tl.where(mask, dz, 0.0).to(dz_ptr.dtype.element_ty), mask=z_mask(u, k, v, c, C, H, W, S))


@triton.jit
def _backward_reduce_partial_kernel(grad_ptr, grad_pooled_ptr, z_ptr, scale_ptr, shift_ptr, mean_ptr,
                                    partial_ptr, C, H, W, cell_rows, cell_cols, rows, rows_per_chunk, chunks,
                                    g_sn, g_sc, g_sh, g_sw, p_sn, p_sc, p_sh, p_sw, z_sn, z_sc, z_sh, z_sw,
                                    S: tl.constexpr, POOL: tl.constexpr, BLOCK_V: tl.constexpr,
                                    BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    c_start = tl.program_id(1) * BLOCK_C
    c = tile_channels(c_start, BLOCK_C)
    scale = load_channels(scale_ptr, c, C)
    shift = load_channels(shift_ptr, c, C)
    mean = load_channels(mean_ptr, c, C)
    # Per-element running sums, summed over the tile only at the end (no cross-thread work in the loop).
    sum_dy = tl.zeros([4, BLOCK_V, BLOCK_C], partial_ptr.dtype.element_ty)
    sum_dy_xmu = tl.zeros([4, BLOCK_V, BLOCK_C], partial_ptr.dtype.element_ty)
    first_row = chunk * rows_per_chunk
    for row in range(first_row, tl.minimum(first_row + rows_per_chunk, rows)):
        for v_start in range(0, cell_cols, BLOCK_V):
            n, u, k, v, _ = tile_indices(row, v_start, c_start, cell_rows, 0, BLOCK_V, BLOCK_C)
            x, dy, mask = relu_pool_dy(grad_ptr, grad_pooled_ptr, z_ptr, scale, shift, n, u, k, v, c, C, H, W,
                                       g_sn, g_sc, g_sh, g_sw, p_sn, p_sc, p_sh, p_sw, z_sn, z_sc, z_sh, z_sw,
                                       S, POOL)
            sum_dy += dy
            sum_dy_xmu += tl.where(mask, dy * (x - mean), 0.0)
    store_partial(partial_ptr, 0, channel_sum(sum_dy), chunk, chunks, c_start, C, BLOCK_C)
    store_partial(partial_ptr, 1, channel_sum(sum_dy_xmu), chunk, chunks, c_start, C, BLOCK_C)


@triton.jit
def _sum_chunks_kernel(partial_ptr, sum_dy_ptr, sum_dy_xmu_ptr, C, chunks, BLOCK_K: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(sum_dy_ptr + channels, sum_partials(partial_ptr, 0, chunks, channels, C, BLOCK_K), mask=channels < C)
    tl.store(sum_dy_xmu_ptr + channels, sum_partials(partial_ptr, 1, chunks, channels, C, BLOCK_K),
             mask=channels < C)


def _backward_geometry(grad, grad_pooled, z, upscale):
    g = geometry(z, upscale)
    check_activation(grad, g, z, "grad")
    if grad_pooled is not None:
        check_activation(grad_pooled, g, z, "grad_pooled", pooled=True)
    return g


def _launch_backward_z(grad, grad_pooled, z, scale, shift, upscale, bn_args):
    """dz laid out like z: the ReLU/max-pool gradient, through BN when ``bn_args`` is
    ``(mean, invstd, sum_dy, sum_dy_xmu)`` (None: relu_pool_backward)."""
    g = _backward_geometry(grad, grad_pooled, z, upscale)
    border = upscale - 1
    t = tiles(g, z, border)
    dz = torch.empty_like(z)
    grad_pooled_arg, grad_pooled_strides = optional_tensor(grad_pooled, grad)
    mean, invstd, sum_dy, sum_dy_xmu = (scale,) * 4 if bn_args is None else bn_args
    _backward_z_kernel[elementwise_grid(g, t, border)](
        grad, grad_pooled_arg, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, dz,
        g.channels, g.height, g.width, g.cell_rows + 2 * border, g.count,
        *grad.stride(), *grad_pooled_strides, *z.stride(), *dz.stride(),
        S=upscale, POOL=grad_pooled is not None, APPLY_BN=bn_args is not None, BLOCK_V=t.block_v,
        BLOCK_C=t.block_c,
    )
    return dz


def relu_pool_backward(grad: torch.Tensor, grad_pooled: Optional[torch.Tensor], z: torch.Tensor,
                       scale: torch.Tensor, shift: torch.Tensor, upscale: int) -> torch.Tensor:
    """Gradient w.r.t. the pre-ReLU values, laid out like z: ``(grad + unpool(grad_pooled)) * (y > 0)``.

    grad: ``[N, C, S*H, S*W]``, grad_pooled: ``[N, C, S*H/2, S*W/2]`` or None, both of z's dtype and any
    strides; z: ``[N, S*S*C, H+S-1, W+S-1]``; scale, shift: ``[C]`` float32 (float64 for float64 z).
    Returns a tensor like z (``empty_like``: same memory format); z entries no logical pixel reads get 0.
    """
    return _launch_backward_z(grad, grad_pooled, z, scale, shift, upscale, None)


def bn_relu_backward_reduce(grad: torch.Tensor, grad_pooled: Optional[torch.Tensor], z: torch.Tensor,
                            scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
                            upscale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (z - mean))`` of the pre-ReLU gradient dy.

    Arguments as relu_pool_backward, plus mean: ``[C]``. Returns two ``[C]`` tensors of mean's dtype
    (float32, float64 for float64 z).
    """
    g = _backward_geometry(grad, grad_pooled, z, upscale)
    r = plan_reduction(g, z, _PARTIALS)
    sum_dy, sum_dy_xmu = r.results
    grad_pooled_arg, grad_pooled_strides = optional_tensor(grad_pooled, grad)
    _backward_reduce_partial_kernel[r.chunk_grid](
        grad, grad_pooled_arg, z, scale, shift, mean, r.partial, g.channels, g.height, g.width, g.cell_rows,
        g.cell_cols, r.rows, r.rows_per_chunk, r.chunks, *grad.stride(), *grad_pooled_strides, *z.stride(),
        S=upscale, POOL=grad_pooled is not None, BLOCK_V=r.tiles.block_v, BLOCK_C=r.tiles.block_c,
    )
    _sum_chunks_kernel[r.combine_grid](
        r.partial, sum_dy, sum_dy_xmu, g.channels, r.chunks, BLOCK_K=_BLOCK_CHUNKS, BLOCK_C=r.tiles.block_c,
    )
    return sum_dy, sum_dy_xmu


def bn_relu_backward_apply(grad: torch.Tensor, grad_pooled: Optional[torch.Tensor], z: torch.Tensor,
                           scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                           sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor, upscale: int) -> torch.Tensor:
    """Gradient w.r.t. z of BN (+ReLU, +max-pool) given the sums of bn_relu_backward_reduce.

    ``dz = scale * (dy - sum_dy/M - (z-mean) * invstd^2 * sum_dy_xmu/M)``, M = N*(S*H)*(S*W); zero sums
    give the eval-mode gradient ``scale * dy``. Arguments as bn_relu_backward_reduce plus invstd, sum_dy,
    sum_dy_xmu: ``[C]``. Returns a tensor like z; z entries no logical pixel reads get 0.
    """
    return _launch_backward_z(grad, grad_pooled, z, scale, shift, upscale, (mean, invstd, sum_dy, sum_dy_xmu))
