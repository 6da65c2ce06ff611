"""The concat buffer between the encoder's double block and the up block, and a block's output buffers."""


import torch

from .. import ops


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=ops.memory_format_of(like))


def concat_parts(buf, skip_channels):
    """The two parts of a concat buffer ``buf`` ``[N, skip_channels + C_up, H, W]`` = torch.cat((skip, up), 1), as
    views (skip, up): the contract of the buffer between the two blocks, kept here. The encoder's double block
    writes the skip part (``cat_channels`` = C_up), the up block the up part; in backward the up block hands the
    whole buffer's gradient on as the skip's, and the double block reads only its skip part of it (the up part's
    gradient is the up block's own)."""
    channels = buf.shape[1]
    message = lambda: f"a concat buffer of {channels} channels has no skip part of {skip_channels} channels"  # noqa
    if torch.compiler.is_compiling():
        torch._check(0 <= skip_channels <= channels, message)
    elif not 0 <= skip_channels <= channels:  # eagerly without torch._check, which imports sympy (30 MiB held)
        raise RuntimeError(message())
    return buf.narrow(1, 0, skip_channels), buf.narrow(1, skip_channels, channels - skip_channels)


def _block_outputs(z, cat_channels, pool):
    """A block's output buffer (with room for the up block's channels), its written part, the pool."""
    n, c, h, w = z.shape
    buf = _empty((n, c + cat_channels, h, w), z)
    pooled = _empty((n, c, h // 2, w // 2), z) if pool else None
    return buf, concat_parts(buf, c)[0], pooled
