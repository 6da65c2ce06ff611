"""Pieces shared by the fastunet Triton kernels: tile indexing, per-element math, launch sizes, checks.

Geometry (fastunet/ops.py, csrc/fastunet_math.h): ``z`` is a conv output ``[N, S*S*C, H+S-1, W+S-1]``,
upscale S in {1, 2}; the logical BN+ReLU output is ``[N, C, S*H, S*W]`` and its pixel ``(n, c, Y, X)``
reads ``z[n, (a*S+b)*C + c, Y//S + a, X//S + b]`` with ``a = Y % S, b = X % S``.

The kernels walk the logical output in 2x2 cells: cell ``(u, v)`` holds the pixels ``k = 2*dy + dx`` at
``(2u+dy, 2v+dx)``. A cell is a max-pool window, and for S = 2 it is the four sub-pixel phases of one
low-res position: pixel k of cell (u, v) reads ``z[n, k*C + c, u+dy, v+dx]``. A program's tile is
``[4, BLOCK_V, BLOCK_C]``: the four pixels of BLOCK_V consecutive cells of one cell row, times BLOCK_C
channels (the contiguous dimension of channels_last tensors). Offsets are int64.
"""

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..ops import acc_dtype

# Whether @triton.jit built interpreted (CPU) kernels: decided once, when triton decorates them.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# ----------------------------------------------------------------------------------------------------
# Tile indexing
# ----------------------------------------------------------------------------------------------------


@triton.jit
def tile_indices(row, v_start, c_start, rows_per_sample, BORDER: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Sample n and cell row u of flattened cell row ``row`` (scalars), pixel-in-cell k [4, 1, 1], cell
    column v [1, BLOCK_V, 1], channel c [1, 1, BLOCK_C]; all int64. BORDER = 1 starts the cells one up
    and one left of the image (so that a tile also covers the border of an upscale-2 z)."""
    n = (row // rows_per_sample).to(tl.int64)
    u = (row % rows_per_sample - BORDER).to(tl.int64)
    k = tl.arange(0, 4).to(tl.int64)[:, None, None]
    v = (v_start - BORDER + tl.arange(0, BLOCK_V)).to(tl.int64)[None, :, None]
    return n, u, k, v, tile_channels(c_start, BLOCK_C)


@triton.jit
def tile_channels(c_start, BLOCK_C: tl.constexpr):
    """Channels c [1, 1, BLOCK_C] (int64) of a tile starting at channel c_start."""
    return (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)[None, None, :]


@triton.jit
def pixel_mask(u, k, v, H, W, S: tl.constexpr):
    """Which tile pixels lie inside the logical output [S*H, S*W] (shape [4, BLOCK_V, 1])."""
    y = 2 * u + k // 2
    x = 2 * v + k % 2
    return (y >= 0) & (y < S * H) & (x >= 0) & (x < S * W)


@triton.jit
def logical_offsets(n, u, k, v, c, s_n, s_c, s_h, s_w):
    """Offsets of the tile pixels in a tensor laid out as the logical output (out, grad)."""
    return n * s_n + c * s_c + (2 * u + k // 2) * s_h + (2 * v + k % 2) * s_w


@triton.jit
def z_position(u, k, v, C, c, S: tl.constexpr):
    """z channel, row and column that the tile pixels read."""
    if S == 2:
        q = k * C + c
        row = u + k // 2
        col = v + k % 2
    else:
        q = c
        row = 2 * u + k // 2
        col = 2 * v + k % 2
    return q, row, col


@triton.jit
def z_offsets(n, u, k, v, c, C, s_n, s_c, s_h, s_w, S: tl.constexpr):
    """Offsets of the tile pixels in a tensor laid out as z."""
    q, row, col = z_position(u, k, v, C, c, S)
    return n * s_n + q * s_c + row * s_h + col * s_w


@triton.jit
def z_mask(u, k, v, c, C, H, W, S: tl.constexpr):
    """Which tile positions are elements of z (those no logical pixel reads included)."""
    _, row, col = z_position(u, k, v, C, c, S)
    return (row >= 0) & (row < H + S - 1) & (col >= 0) & (col < W + S - 1) & (c < C)


@triton.jit
def cell_offsets(n, u, v, c, s_n, s_c, s_h, s_w):
    """Offsets of the tile's cells in a max-pooled tensor (pooled, grad_pooled): [1, BLOCK_V, BLOCK_C]."""
    return n * s_n + c * s_c + u * s_h + v * s_w


@triton.jit
def cell_mask(u, v, c, C, H, W, S: tl.constexpr):
    """Which tile cells are max-pool windows of the (even-sized) logical output."""
    return (u >= 0) & (u < S * H // 2) & (v >= 0) & (v < S * W // 2) & (c < C)


@triton.jit
def store_partial(partial_ptr, plane, value, chunk, chunks, c_start, C, BLOCK_C: tl.constexpr):
    """Stores one chunk's partial result ``value`` [BLOCK_C] into plane ``plane`` of [planes, chunks, C]."""
    channels = c_start + tl.arange(0, BLOCK_C)
    tl.store(partial_ptr + (plane * chunks + chunk) * C + channels, value, mask=channels < C)


@triton.jit
def sum_partials(partial_ptr, plane, chunks, channels, C, BLOCK_K: tl.constexpr):
    """Sum over the chunks of plane ``plane`` of [planes, chunks, C] partial results, at ``channels``."""
    total = tl.zeros(channels.shape, partial_ptr.dtype.element_ty)
    for k_start in range(0, chunks, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        mask = (k < chunks)[:, None] & (channels < C)[None, :]
        partial = tl.load(partial_ptr + (plane * chunks + k[:, None]) * C + channels[None, :], mask=mask, other=0)
        total += tl.sum(partial, axis=0)
    return total


@triton.jit
def channel_sum(x):
    """Sum of a [4, BLOCK_V, BLOCK_C] tile over its pixels: [BLOCK_C]."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


# ----------------------------------------------------------------------------------------------------
# Per-element math (as fastunet_math.h)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def product_rn(a, b):
    """``a * b`` rounded on its own, never contracted with a following add into an FMA: PyTorch's
    ``z*scale + shift`` rounds twice, and forward, backward and reference must agree bit for bit."""
    if INTERPRET:
        p = a * b
    elif a.dtype == tl.float64:
        p = tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                      is_pure=True, pack=1)
    else:
        p = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return p


@triton.jit
def bn_relu(x, scale, shift):
    """``relu(x*scale + shift)``; NaN propagates, as torch.relu."""
    v = product_rn(x, scale) + shift
    return tl.where(v < 0, 0.0, v)


@triton.jit
def bn_backward_dz(dy, x, mean, invstd, scale, sum_dy, sum_dy_xmu, count):
    """BatchNorm's training-mode input gradient (as fastunet_math.h's bn_backward_dz and fastunet.ops.bn_backward_dz):
    ``scale * (dy - sum_dy/count - (x - mean) * invstd^2 * sum_dy_xmu/count)``."""
    inv_count = 1.0 / tl.cast(count, scale.dtype)
    projection = invstd * invstd * sum_dy_xmu * inv_count
    return scale * (dy - sum_dy * inv_count - (x - mean) * projection)


@triton.jit
def bn_relu_tile(z_ptr, scale, shift, n, u, k, v, c, C, mask, z_sn, z_sc, z_sh, z_sw, S: tl.constexpr,
                 ROUND_TO: tl.constexpr):
    """z of the tile pixels and their BN+ReLU output rounded through ROUND_TO (the stored dtype), both in
    scale's dtype."""
    x = tl.load(z_ptr + z_offsets(n, u, k, v, c, C, z_sn, z_sc, z_sh, z_sw, S), mask=mask, other=0)
    x = x.to(scale.dtype)
    return x, bn_relu(x, scale, shift).to(ROUND_TO).to(scale.dtype)


@triton.jit
def pool_argmax(y, k):
    """Max-pool value and winning pixel k of each cell of tile y, as [1, BLOCK_V, BLOCK_C]. As ATen's
    max_pool2d, which scans from -inf and takes v when (v > best or isnan(v)): the last NaN wins, else the
    first maximum."""
    is_nan = y != y
    last_nan = tl.max(tl.where(is_nan, k, -1), axis=0, keep_dims=True)
    best = tl.max(tl.where(is_nan, float("-inf"), y), axis=0, keep_dims=True)
    first_best = tl.min(tl.where(y == best, k, 4), axis=0, keep_dims=True)
    has_nan = last_nan >= 0
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, last_nan, first_best)


@triton.jit
def relu_pool_dy(grad_ptr, grad_pooled_ptr, z_ptr, scale, shift, n, u, k, v, c, C, H, W,
                 g_sn, g_sc, g_sh, g_sw, p_sn, p_sc, p_sh, p_sw, z_sn, z_sc, z_sh, z_sw,
                 S: tl.constexpr, POOL: tl.constexpr):
    """z, the gradient reaching the pre-ReLU values (0 off the image) and the in-image mask of the tile
    pixels: ``(grad + grad_pooled at the pool argmax) * (y > 0)``, y recomputed in grad's dtype."""
    mask = pixel_mask(u, k, v, H, W, S) & (c < C)
    x, y = bn_relu_tile(z_ptr, scale, shift, n, u, k, v, c, C, mask, z_sn, z_sc, z_sh, z_sw, S,
                        grad_ptr.dtype.element_ty)
    g = tl.load(grad_ptr + logical_offsets(n, u, k, v, c, g_sn, g_sc, g_sh, g_sw), mask=mask, other=0)
    g = g.to(y.dtype)
    if POOL:
        _, winner = pool_argmax(y, k)
        gp = tl.load(grad_pooled_ptr + cell_offsets(n, u, v, c, p_sn, p_sc, p_sh, p_sw),
                     mask=cell_mask(u, v, c, C, H, W, S), other=0)
        g = tl.where(k == winner, g + gp.to(y.dtype), g)
    return x, tl.where(mask & (y > 0), g, 0.0), mask


@triton.jit
def load_channels(ptr, c, C):
    """A per-channel vector at channels c (0 past C)."""
    return tl.load(ptr + c, mask=c < C, other=0)


# ----------------------------------------------------------------------------------------------------
# Host side: geometry, checks, launch sizes
# ----------------------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    """Sizes of one op call: batch, logical channels C, low-res height H and width W, upscale S."""

    batch: int
    channels: int
    height: int
    width: int
    upscale: int

    @property
    def out_hw(self):
        return self.upscale * self.height, self.upscale * self.width

    @property
    def cell_rows(self):
        return triton.cdiv(self.upscale * self.height, 2)

    @property
    def cell_cols(self):
        return triton.cdiv(self.upscale * self.width, 2)

    @property
    def count(self):
        """Logical pixels per channel."""
        return self.batch * self.upscale * self.height * self.upscale * self.width


def geometry(z, upscale):
    """Geometry of conv output ``z`` for ``upscale``, checking z."""
    torch._check(upscale in (1, 2), lambda: f"fastunet: upscale must be 1 or 2, got {upscale}")
    torch._check(z.dim() == 4, lambda: f"fastunet: expected a 4-D conv output, got {z.dim()}-D")
    n, q, zh, zw = z.shape
    torch._check(q % (upscale * upscale) == 0, lambda: f"fastunet: {q} conv channels, not a multiple of "
                                                       f"upscale^2")
    torch._check(zh >= upscale and zw >= upscale, lambda: f"fastunet: z of shape {tuple(z.shape)} too small")
    return Geometry(n, q // (upscale * upscale), zh - upscale + 1, zw - upscale + 1, upscale)


def check_activation(t, g, z, name, pooled=False):
    """Checks that ``t`` has the logical output's shape (max-pooled when ``pooled``) and z's dtype."""
    h, w = g.out_hw
    if pooled:
        torch._check(h % 2 == 0 and w % 2 == 0, lambda: f"fastunet: max-pool needs an even size, got {h}x{w}")
        h, w = h // 2, w // 2
    shape = (g.batch, g.channels, h, w)
    torch._check(tuple(t.shape) == shape, lambda: f"fastunet: {name} must have shape {shape}, got {tuple(t.shape)}")
    torch._check(t.dtype == z.dtype, lambda: f"fastunet: {name} is {t.dtype} but z is {z.dtype}")


def optional_tensor(t, stand_in):
    """``(t, t's strides)``, or a stand-in pointer and zero strides when ``t`` is None."""
    return (stand_in, (0, 0, 0, 0)) if t is None else (t, t.stride())


class Tiles(NamedTuple):
    block_v: int
    block_c: int


def tiles(g, z, border=0):
    """Tile sizes: up to 64 channels by as many cells as make 2048 elements (4 pixels a cell), or fewer
    channels by more cells where z's channels are not its contiguous dimension (NCHW)."""
    most_c = 64 if z.stride(1) == 1 else 4
    block_c = min(triton.next_power_of_2(g.channels), most_c)
    block_v = min(512 // block_c, triton.next_power_of_2(g.cell_cols + 2 * border))
    return Tiles(block_v, block_c)


def elementwise_grid(g, t, border=0):
    """One program per (sample, cell row) x cell-column block x channel block; border adds a cell all round."""
    return (
        g.batch * (g.cell_rows + 2 * border),
        triton.cdiv(g.cell_cols + 2 * border, t.block_v),
        triton.cdiv(g.channels, t.block_c),
    )


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class Reduction(NamedTuple):
    """Plan of a two-step per-channel reduction. Step one: ``chunks`` programs per channel block, each
    reducing ``rows_per_chunk`` of the ``rows`` cell rows (the last chunk shorter) into ``partial``
    ``[planes, chunks, C]``; step two: one program per channel block combines the chunks into ``results``,
    two ``[C]`` tensors."""

    tiles: Tiles
    rows: int
    rows_per_chunk: int
    chunks: int
    partial: torch.Tensor
    results: tuple

    @property
    def chunk_grid(self):
        return self.chunks, triton.cdiv(self.partial.shape[2], self.tiles.block_c)

    @property
    def combine_grid(self):
        return (triton.cdiv(self.partial.shape[2], self.tiles.block_c),)


def plan_reduction(g, z, planes):
    """About four programs per multiprocessor (four in all on the CPU), in a split fixed by the shapes."""
    t = tiles(g, z)
    if z.device.type == "cuda":
        index = z.device.index if z.device.index is not None else torch.cuda.current_device()
        programs = 4 * _multiprocessors(index)
    else:
        programs = 4
    rows = g.batch * g.cell_rows
    wanted = max(1, min(rows, triton.cdiv(programs, triton.cdiv(g.channels, t.block_c))))
    rows_per_chunk = triton.cdiv(rows, wanted)
    chunks = triton.cdiv(rows, rows_per_chunk)
    dtype = acc_dtype(z.dtype)
    partial = torch.empty((planes, chunks, g.channels), dtype=dtype, device=z.device)
    results = tuple(torch.empty(g.channels, dtype=dtype, device=z.device) for _ in range(2))
    return Reduction(t, rows, rows_per_chunk, chunks, partial, results)
