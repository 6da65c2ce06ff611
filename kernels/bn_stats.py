"""bn_stats: per-channel batch mean and biased variance of the logical BN input read from a conv output.

Shifted sums, robust when the mean is large against the standard deviation: each channel's values are
taken relative to one of them (its first logical pixel, z[0, c, 0, 0]), so that the sums of the
differences and of their squares stay small and exact-ish in float32. Two steps, no atomics
(deterministic): per-chunk partial sums (kept per tile element, summed over the tile at the end), then a
per-channel sum over the chunks that also forms mean and variance.
"""

import torch
import triton
import triton.language as tl

from .utils import (
    channel_sum,
    geometry,
    pixel_mask,
    plan_reduction,
    store_partial,
    sum_partials,
    tile_channels,
    tile_indices,
    z_offsets,
)

_PARTIALS = 2  # sum of (z - shift), sum of (z - shift)^2
_BLOCK_CHUNKS = 32


@triton.jit
def _channel_shift(z_ptr, c, C, z_sc, acc: tl.constexpr):
    """The value each channel's sums are taken relative to: its logical pixel (0, c, 0, 0), z[0, c, 0, 0]."""
    return tl.load(z_ptr + c * z_sc, mask=c < C, other=0).to(acc)


@triton.jit
def _bn_stats_partial_kernel(z_ptr, partial_ptr, C, H, W, cell_rows, cell_cols, rows, rows_per_chunk,
                             chunks, z_sn, z_sc, z_sh, z_sw, S: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    c_start = tl.program_id(1) * BLOCK_C
    acc = partial_ptr.dtype.element_ty
    c = tile_channels(c_start, BLOCK_C)
    shift = _channel_shift(z_ptr, c, C, z_sc, acc)
    sum_d = tl.zeros([4, BLOCK_V, BLOCK_C], acc)
    sum_d2 = tl.zeros([4, BLOCK_V, BLOCK_C], acc)
    first_row = chunk * rows_per_chunk
    for row in range(first_row, tl.minimum(first_row + rows_per_chunk, rows)):
        for v_start in range(0, cell_cols, BLOCK_V):
            n, u, k, v, _ = tile_indices(row, v_start, c_start, cell_rows, 0, BLOCK_V, BLOCK_C)
            mask = pixel_mask(u, k, v, H, W, S) & (c < C)
            x = tl.load(z_ptr + z_offsets(n, u, k, v, c, C, z_sn, z_sc, z_sh, z_sw, S), mask=mask, other=0)
            d = tl.where(mask, x.to(acc) - shift, 0.0)
            sum_d += d
            sum_d2 += d * d
    store_partial(partial_ptr, 0, channel_sum(sum_d), chunk, chunks, c_start, C, BLOCK_C)
    store_partial(partial_ptr, 1, channel_sum(sum_d2), chunk, chunks, c_start, C, BLOCK_C)


@triton.jit
def _bn_stats_finalize_kernel(z_ptr, partial_ptr, mean_ptr, var_ptr, C, count, chunks, z_sc,
                              BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = partial_ptr.dtype.element_ty
    inv_count = 1.0 / tl.cast(count, acc)
    mean_d = sum_partials(partial_ptr, 0, chunks, channels, C, BLOCK_K) * inv_count
    var = sum_partials(partial_ptr, 1, chunks, channels, C, BLOCK_K) * inv_count - mean_d * mean_d
    shift = _channel_shift(z_ptr, channels.to(tl.int64), C, z_sc, acc)
    tl.store(mean_ptr + channels, shift + mean_d, mask=channels < C)
    tl.store(var_ptr + channels, tl.where(var < 0.0, 0.0, var), mask=channels < C)  # NaN stays NaN


def bn_stats(z: torch.Tensor, upscale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of the logical BN input read from conv output ``z``.

    z: ``[N, S*S*C, H+S-1, W+S-1]`` float32/float16/bfloat16/float64, any strides; upscale S: 1 or 2.
    Returns mean and var, ``[C]`` float32 (float64 for float64 z). Needs at least one pixel per channel.
    """
    g = geometry(z, upscale)
    torch._check(g.count > 0, lambda: "fastunet.bn_stats: empty batch")
    r = plan_reduction(g, z, _PARTIALS)
    mean, var = r.results
    _bn_stats_partial_kernel[r.chunk_grid](
        z, r.partial, g.channels, g.height, g.width, g.cell_rows, g.cell_cols, r.rows, r.rows_per_chunk, r.chunks,
        *z.stride(), S=upscale, BLOCK_V=r.tiles.block_v, BLOCK_C=r.tiles.block_c,
    )
    _bn_stats_finalize_kernel[r.combine_grid](
        z, r.partial, mean, var, g.channels, g.count, r.chunks, z.stride(1), BLOCK_K=_BLOCK_CHUNKS,
        BLOCK_C=r.tiles.block_c,
    )
    return mean, var
