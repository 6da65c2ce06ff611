"""bn_relu_pool: BN apply + ReLU of a conv output into the logical output, and optionally its 2x2 max-pool.

One program per tile of 2x2 cells: a cell is exactly one max-pool window, so the pooled value is picked
from the four values in registers.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import (
    bn_relu_tile,
    cell_mask,
    cell_offsets,
    check_activation,
    elementwise_grid,
    geometry,
    load_channels,
    logical_offsets,
    optional_tensor,
    pixel_mask,
    pool_argmax,
    tile_indices,
    tiles,
)


@triton.jit
def _bn_relu_pool_kernel(z_ptr, scale_ptr, shift_ptr, out_ptr, pooled_ptr, C, H, W, cell_rows,
                         z_sn, z_sc, z_sh, z_sw, o_sn, o_sc, o_sh, o_sw, p_sn, p_sc, p_sh, p_sw,
                         S: tl.constexpr, POOL: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    n, u, k, v, c = tile_indices(tl.program_id(0), tl.program_id(1) * BLOCK_V, tl.program_id(2) * BLOCK_C,
                                 cell_rows, 0, BLOCK_V, BLOCK_C)
    out_dtype = out_ptr.dtype.element_ty
    mask = pixel_mask(u, k, v, H, W, S) & (c < C)
    _, y = bn_relu_tile(z_ptr, load_channels(scale_ptr, c, C), load_channels(shift_ptr, c, C), n, u, k, v, c,
                        C, mask, z_sn, z_sc, z_sh, z_sw, S, out_dtype)
    tl.store(out_ptr + logical_offsets(n, u, k, v, c, o_sn, o_sc, o_sh, o_sw), y.to(out_dtype), mask=mask)
    if POOL:
        best, _ = pool_argmax(y, k)
        tl.store(pooled_ptr + cell_offsets(n, u, v, c, p_sn, p_sc, p_sh, p_sw), best.to(out_dtype),
                 mask=cell_mask(u, v, c, C, H, W, S))


def bn_relu_pool(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, upscale: int, out: torch.Tensor,
                 pooled: Optional[torch.Tensor] = None) -> None:
    """Writes ``out = relu(z*scale + shift)`` in the logical layout and, if given, ``pooled = maxpool2x2(out)``.

    z: ``[N, S*S*C, H+S-1, W+S-1]``, any strides; scale, shift: ``[C]`` float32 (float64 for float64 z);
    out: ``[N, C, S*H, S*W]`` of z's dtype, any strides (a concat-buffer channel slice works);
    pooled: ``[N, C, S*H/2, S*W/2]`` of z's dtype or None. Max-pool ties and NaNs follow ATen's max_pool2d.
    """
    g = geometry(z, upscale)
    check_activation(out, g, z, "out")
    if pooled is not None:
        check_activation(pooled, g, z, "pooled", pooled=True)
    t = tiles(g, z)
    pooled_arg, pooled_strides = optional_tensor(pooled, out)
    _bn_relu_pool_kernel[elementwise_grid(g, t)](
        z, scale, shift, out, pooled_arg, g.channels, g.height, g.width, g.cell_rows,
        *z.stride(), *out.stride(), *pooled_strides,
        S=upscale, POOL=pooled is not None, BLOCK_V=t.block_v, BLOCK_C=t.block_c,
    )
