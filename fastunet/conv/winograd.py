"""Winograd F(2x2, 3x3): the CPU's float32 3x3 convolutions (stride 1, padding 1) with 16 multiplies per 2 x 2
output tile and (input, output) channel pair instead of 36, for fast mode's wide layers.

Ops ``torch.ops.fastunet.winograd_*``, compiled in csrc/winograd.cpp, specified by the ``*_ref`` functions here
(which serve other devices and dtypes):

  * ``winograd_weights(weight [Cout, Cin, 3, 3], scale [Cout] or None, transposed, u [16, Cin, Cout])``:
    ``G g G^T`` of each (optionally scaled) 3x3 kernel; ``transposed`` gives the input gradient's conv instead
    (the kernel rotated by 180 degrees, input and output channels swapped: u is ``[16, Cout, Cin]``); u's rows
    contiguous, its planes any distance apart;
  * ``winograd_input(x [N, C, H, W], first_tile, v [16, tiles, C])``: ``B^T d B`` of the 4 x 4 input tiles
    ``first_tile ...`` (zero padding) of the ``N * ceil(H/2) * ceil(W/2)`` (row-major over n, tile row, tile column);
  * ``winograd_output(m [16, tiles, Cout], bias or None, relu, first_tile, out [N, Cout, H, W])``: ``A^T m A`` of
    those tiles plus the bias, ReLU'd if asked (a NaN stays), written into ``out`` (any strides: a concat-buffer
    slice works);
  * ``winograd_conv3x3(x, u, bias or None, relu, chunk_tiles, out)``: the whole conv, chunks of ``chunk_tiles``
    tiles in parallel, each thread running the two transforms above around ATen's batched GEMM ``V @ U`` on its
    own chunk, V and M in its cache;
  * ``winograd_weight_grad(x, grad, chunk_tiles, grad_weight [Cout, Cin, 3, 3])``: the conv's weight gradient,
    ``G^T (sum over tiles of V^T Gd) G`` with ``Gd = A dy A^T`` of each 2 x 2 tile of the output's gradient, in
    chunks likewise (one accumulator per thread, summed in thread order).

``weights`` (U, made at the call) and ``conv3x3`` are the Python entry points. Nothing is kept between calls: U and
the chunks' V and M buffers of winograd_conv3x3 are made for the call (glibc hands the blocks freed by one call to
the next, so a steady-state call faults in few fresh pages). Where Winograd runs, and its chunk sizes, are
fastunet.conv.policy's choices. The transforms only add (and halve, exactly), so the float32 error stays at the
direct convolution's or below: the GEMMs sum over Cin terms where a direct 3x3 conv sums over 9 Cin.
"""


import torch
import torch.nn.functional as F

from .. import _ext, ops
from . import policy

__all__ = ["weights", "conv3x3", "conv3x3_input_grad", "conv3x3_weight_grad", "WINOGRAD_OPS"]


def _kernel_transform(g0, g1, g2):
    """G applied to three rows (or columns) of a kernel: four."""
    return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2


def _input_transform(d0, d1, d2, d3):
    """B^T applied to four rows (or columns) of a tile."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def winograd_weights_ref(weight, scale, transposed, u):
    w = weight if scale is None else weight * scale.view(-1, 1, 1, 1)
    if transposed:
        w = w.transpose(0, 1).flip(2, 3)
    g = w.permute(2, 3, 1, 0)  # [3, 3, Cin, Cout] of the transformed conv
    rows = _kernel_transform(g[0], g[1], g[2])  # 4 x [3, Cin, Cout]
    u.copy_(torch.stack([t for row in rows for t in _kernel_transform(row[0], row[1], row[2])]))


def _tiles(x):
    n, _, h, w = x.shape
    return n * ((h + 1) // 2) * ((w + 1) // 2)


def winograd_input_ref(x, first_tile, v):
    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    padded = F.pad(x, (1, 1 + w % 2, 1, 1 + h % 2))
    d = [[padded[:, :, r:r + 2 * th:2, s:s + 2 * tw:2] for s in range(4)] for r in range(4)]
    cols = [_input_transform(d[0][s], d[1][s], d[2][s], d[3][s]) for s in range(4)]  # cols[s][r]
    rows = [t for r in range(4) for t in _input_transform(cols[0][r], cols[1][r], cols[2][r], cols[3][r])]
    all_tiles = torch.stack([t.permute(0, 2, 3, 1).reshape(n * th * tw, c) for t in rows])
    v.copy_(all_tiles[:, first_tile:first_tile + v.shape[1]])


def winograd_output_ref(m, bias, relu, first_tile, out):
    n, c, h, w = out.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    tiles = m.shape[1]
    mk = m.view(4, 4, tiles, c)
    s0 = [mk[0, s] + mk[1, s] + mk[2, s] for s in range(4)]
    s1 = [mk[1, s] - mk[2, s] - mk[3, s] for s in range(4)]
    b = bias if bias is not None else torch.zeros(c, dtype=m.dtype, device=m.device)
    y = torch.stack([s0[0] + s0[1] + s0[2] + b, s0[1] - s0[2] - s0[3] + b,
                     s1[0] + s1[1] + s1[2] + b, s1[1] - s1[2] - s1[3] + b])  # [4 (2a + b), tiles, C]
    if relu:
        y = torch.where(y < 0, torch.zeros((), dtype=y.dtype, device=y.device), y)
    full = torch.full((4, n * th * tw, c), float("nan"), dtype=y.dtype, device=y.device)
    full[:, first_tile:first_tile + tiles] = y
    full = full.view(2, 2, n, th, tw, c).permute(2, 5, 3, 0, 4, 1).reshape(n, c, 2 * th, 2 * tw)[:, :, :h, :w]
    written = torch.zeros(n * th * tw, dtype=torch.bool, device=y.device)
    written[first_tile:first_tile + tiles] = True
    mask = written.view(n, 1, th, 1, tw, 1).expand(n, 1, th, 2, tw, 2).reshape(n, 1, 2 * th, 2 * tw)[:, :, :h, :w]
    out.copy_(torch.where(mask, full, out))


def _grad_transform(y0, y1):
    """A applied to two rows (or columns) of an output-gradient tile: four."""
    return y0, y0 + y1, y0 - y1, -y1


def _grad_back_transform(d0, d1, d2, d3):
    """G^T applied to four rows (or columns) of a tile's weight gradient: three."""
    return d0 + (d1 + d2) * 0.5, (d1 - d2) * 0.5, (d1 + d2) * 0.5 + d3


def winograd_weight_grad_ref(x, grad, chunk_tiles, grad_weight):
    n, cin, h, w = x.shape
    cout, tiles = grad.shape[1], _tiles(x)
    v = torch.empty(16, tiles, cin, dtype=x.dtype, device=x.device)
    winograd_input_ref(x, 0, v)
    padded = F.pad(grad, (0, w % 2, 0, h % 2))
    y = [[padded[:, :, a::2, b::2] for b in range(2)] for a in range(2)]
    cols = [_grad_transform(y[0][b], y[1][b]) for b in range(2)]  # cols[b][k1]
    gd = [t for k1 in range(4) for t in _grad_transform(cols[0][k1], cols[1][k1])]
    gd = torch.stack([t.permute(0, 2, 3, 1).reshape(tiles, cout) for t in gd])
    du = torch.bmm(v.transpose(1, 2), gd).view(4, 4, cin, cout)
    rows = _grad_back_transform(du[0], du[1], du[2], du[3])  # 3 x [4, Cin, Cout]
    dw = torch.stack([torch.stack(_grad_back_transform(r[0], r[1], r[2], r[3])) for r in rows])  # [3, 3, Cin, Cout]
    grad_weight.copy_(dw.permute(3, 2, 0, 1))


def winograd_conv3x3_ref(x, u, bias, relu, chunk_tiles, out):
    tiles, cin = _tiles(x), x.shape[1]
    v = torch.empty(16, tiles, cin, dtype=x.dtype, device=x.device)
    winograd_input_ref(x, 0, v)
    winograd_output_ref(torch.bmm(v, u), bias, relu, 0, out)


def _check_weight(weight):
    torch._check(weight.dim() == 4 and weight.shape[2] == 3 and weight.shape[3] == 3,
                 lambda: f"winograd_weights: expected a [Cout, Cin, 3, 3] weight, got {tuple(weight.shape)}")


def winograd_weights_fake(weight, scale, transposed, u):
    _check_weight(weight)
    a, b = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    torch._check(tuple(u.shape) == (16, a, b), lambda: f"winograd_weights: u must be [16, {a}, {b}]")


def _check_tile_rows(op, t, image, first_tile):
    torch._check(t.dim() == 3 and t.shape[0] == 16 and t.shape[2] == image.shape[1],
                 lambda: f"{op}: expected [16, tiles, {image.shape[1]}], got {tuple(t.shape)}")
    torch._check(0 <= first_tile and first_tile + t.shape[1] <= _tiles(image),
                 lambda: f"{op}: tiles {first_tile}..{first_tile + t.shape[1]} outside the image's {_tiles(image)}")


def winograd_input_fake(x, first_tile, v):
    torch._check(x.dim() == 4, lambda: f"winograd_input: expected [N, C, H, W], got {x.dim()}-D")
    _check_tile_rows("winograd_input", v, x, first_tile)


def winograd_output_fake(m, bias, relu, first_tile, out):
    torch._check(out.dim() == 4, lambda: f"winograd_output: expected out [N, C, H, W], got {out.dim()}-D")
    _check_tile_rows("winograd_output", m, out, first_tile)


def winograd_conv3x3_fake(x, u, bias, relu, chunk_tiles, out):
    torch._check(x.dim() == 4 and out.dim() == 4, lambda: "winograd_conv3x3: x and out must be [N, C, H, W]")
    torch._check(tuple(u.shape) == (16, x.shape[1], out.shape[1]),
                 lambda: f"winograd_conv3x3: u must be [16, {x.shape[1]}, {out.shape[1]}], got {tuple(u.shape)}")
    torch._check(chunk_tiles > 0, lambda: "winograd_conv3x3: chunk_tiles must be positive")


def winograd_weight_grad_fake(x, grad, chunk_tiles, grad_weight):
    torch._check(x.dim() == 4 and grad.dim() == 4, lambda: "winograd_weight_grad: x and grad must be [N, C, H, W]")
    torch._check(tuple(grad_weight.shape) == (grad.shape[1], x.shape[1], 3, 3),
                 lambda: f"winograd_weight_grad: grad_weight must be [{grad.shape[1]}, {x.shape[1]}, 3, 3]")
    torch._check(chunk_tiles > 0, lambda: "winograd_weight_grad: chunk_tiles must be positive")


# name: (schema, reference, fake); the compiled library declares the same schemas (csrc/winograd.cpp).
WINOGRAD_OPS = {
    "winograd_weights": ("winograd_weights(Tensor weight, Tensor? scale, bool transposed, Tensor(a!) u) -> ()",
                         winograd_weights_ref, winograd_weights_fake),
    "winograd_input": ("winograd_input(Tensor x, int first_tile, Tensor(a!) v) -> ()", winograd_input_ref,
                       winograd_input_fake),
    "winograd_output": ("winograd_output(Tensor m, Tensor? bias, bool relu, int first_tile, Tensor(a!) out) -> ()",
                        winograd_output_ref, winograd_output_fake),
    "winograd_conv3x3": ("winograd_conv3x3(Tensor x, Tensor u, Tensor? bias, bool relu, int chunk_tiles, "
                         "Tensor(a!) out) -> ()", winograd_conv3x3_ref, winograd_conv3x3_fake),
    "winograd_weight_grad": ("winograd_weight_grad(Tensor x, Tensor grad, int chunk_tiles, Tensor(a!) grad_weight) "
                             "-> ()", winograd_weight_grad_ref, winograd_weight_grad_fake),
}


_LIBRARY = torch.library.Library("fastunet", "FRAGMENT")


def _register():
    for name, (schema, reference, fake) in WINOGRAD_OPS.items():
        if not _ext.available():
            _LIBRARY.define(schema)
        torch.library.register_fake(f"fastunet::{name}", fake, lib=_LIBRARY)
        _LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
        if ops.backend_for("cpu") == "reference" and _ext.available():
            _LIBRARY.impl(name, reference, "CPU")


_register()


def weights(weight, scale=None, transposed=False):
    """U ``[16, Cin, Cout]`` (``[16, Cout, Cin]`` if ``transposed``) of a float32 ``[Cout, Cin, 3, 3]`` weight,
    each output channel's kernel multiplied by ``scale`` (``[Cout]``) if given, for ``conv3x3``; a buffer of its
    own, freed with the tensor (nothing is kept between calls; an inference snapshot holds its U)."""
    return _transformed(torch.empty(_u_floats(weight), device=weight.device), weight, scale, transposed)


def _u_floats(weight):
    # The 16 planes a cache line more than a power of two apart (Cin * Cout is one here): not all in the same cache
    # sets.
    return 16 * (weight.shape[0] * weight.shape[1] + 16)


def _transformed(floats, weight, scale, transposed):
    """U of ``weights`` in ``floats`` (_u_floats of them)."""
    cout, cin = weight.shape[:2]
    a, b = (cout, cin) if transposed else (cin, cout)
    u = floats.as_strided((16, a, b), (a * b + 16, b, 1))
    torch.ops.fastunet.winograd_weights(weight, scale, transposed, u)
    return u


def conv3x3(x, u, bias=None, relu=False, out=None):
    """``conv2d(x, weight, bias, padding=1)``, ReLU'd if ``relu``, by Winograd F(2x2, 3x3).

    x: ``[N, Cin, H, W]`` float32, any layout; u: ``weights(weight)``, ``[16, Cin, Cout]``; bias: ``[Cout]`` or
    None; out: where to write ``[N, Cout, H, W]`` (any strides), else a new tensor in x's layout. Returns out.
    """
    n, cin, h, w = x.shape
    cout = u.shape[2]
    if out is None:
        out = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=ops.memory_format_of(x))
    torch.ops.fastunet.winograd_conv3x3(x, u, bias, relu, chunk_tiles(_tiles(x), cin, cout), out)
    return out


def chunk_tiles(tiles, cin, cout):
    """Tiles per chunk of winograd_conv3x3 (fastunet.conv.policy.chunk_tiles, over this thread's threads)."""
    return policy.chunk_tiles(tiles, cin, cout, torch.get_num_threads())


def conv3x3_input_grad(grad, weight, out=None):
    """The gradient of ``conv2d(x, weight, padding=1)`` with respect to x, from the output's gradient ``grad``
    ``[N, Cout, H, W]`` (float32): a Winograd conv of grad with the rotated, transposed kernel; written into ``out``
    if given, else a new tensor in grad's layout. Returns it."""
    return conv3x3(grad, weights(weight, transposed=True), out=out)


def conv3x3_weight_grad(x, grad, out=None):
    """The gradient of ``conv2d(x, weight, padding=1)`` with respect to its ``[Cout, Cin, 3, 3]`` weight, from x
    ``[N, Cin, H, W]`` and the output's gradient ``grad`` ``[N, Cout, H, W]`` (float32, any layouts), by Winograd;
    written into ``out`` if given (any strides), else a new contiguous tensor. Returns it."""
    cin, cout = x.shape[1], grad.shape[1]
    if out is None:
        out = torch.empty((cout, cin, 3, 3), dtype=x.dtype, device=x.device)
    torch.ops.fastunet.winograd_weight_grad(x, grad, chunk_tiles(_tiles(x), cin, cout), out)
    return out
