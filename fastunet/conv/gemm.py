"""Convolutions as GEMMs, where the weights outweigh the pixels: im2col against the weights as they lie (F.unfold's
channels-outer columns for NCHW weights, taps-outer columns for channels_last ones, so the weights are never
copied), their backward, and the shifted GEMMs of the channels_last sub-pixel conv's backward."""

import torch
import torch.nn.functional as F

from .. import ops


def taps_outer_columns(x, k):
    """im2col of ``x`` ``[N, Cin, H, W]`` (any layout) for a k x k conv with padding 1: ``[N, Ho*Wo, k*k*Cin]``, the
    pixels as rows, taps outside the channels within a row (the order of a channels_last weight's memory)."""
    n, cin, h, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [N, H + 2, W + 2, Cin]
    sn, sh, sw, sc = padded.stride()
    ho, wo = h + 3 - k, width + 3 - k
    return padded.as_strided((n, ho, wo, k, k, cin), (sn, sh, sw, sh, sw, sc)).reshape(n, ho * wo, k * k * cin)


def taps_outer_weights(w):
    """A channels_last weight ``[Cout, Cin, k, k]`` as the ``[Cout, k*k*Cin]`` matrix its memory holds (a view)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def forward(x, w):
    """``conv2d(x, w, padding=1)`` (k x k, no bias) as im2col and one GEMM per image, the output in x's layout."""
    n, _, h, width = x.shape
    cout, k = w.shape[0], w.shape[2]
    if ops.memory_format_of(w) == torch.channels_last:
        rows = torch.bmm(taps_outer_columns(x, k), taps_outer_weights(w).t().expand(n, -1, -1))  # [N, pixels, Cout]
        z = rows.view(n, h + 3 - k, width + 3 - k, cout).permute(0, 3, 1, 2)
    else:
        z = torch.bmm(w.reshape(cout, -1).expand(n, -1, -1), F.unfold(x, k, padding=1))  # [N, Cout, pixels]
        z = z.view(n, cout, h + 3 - k, width + 3 - k)
    return z.contiguous(memory_format=ops.memory_format_of(x))


def backward(dz, x, w, output_mask):
    """(dx, dw) of ``forward``, each None where ``output_mask`` says so: the input's through F.fold, the weights' as
    one GEMM over the batch."""
    if ops.memory_format_of(w) == torch.channels_last:
        return _taps_outer_backward(dz, x, w, output_mask)
    n, cin, h, width = x.shape
    cout, k = w.shape[0], w.shape[2]
    dz = dz.reshape(n, cout, -1)
    dx = dw = None
    if output_mask[0]:
        cols_grad = torch.bmm(w.reshape(cout, -1).t().expand(n, -1, -1), dz)  # [N, Cin*k*k, pixels]
        dx = F.fold(cols_grad, (h, width), k, padding=1).contiguous(memory_format=ops.memory_format_of(x))
    if output_mask[1]:
        cols = F.unfold(x, k, padding=1)  # [N, Cin*k*k, pixels]
        dw = torch.mm(dz.transpose(0, 1).reshape(cout, -1), cols.transpose(1, 2).reshape(-1, cin * k * k))
        dw = dw.view(w.shape)
    return dx, dw


def _taps_outer_backward(dz, x, w, output_mask):
    """``backward`` for a channels_last weight: the columns taps outside the channels, so the weight is read as it
    lies and its gradient comes out channels_last, neither copied."""
    n, cin, h, width = x.shape
    cout, k = w.shape[0], w.shape[2]
    rows_dz = dz.permute(0, 2, 3, 1).reshape(n, -1, cout)  # [N, pixels, Cout]
    dx = dw = None
    if output_mask[0]:
        cols_grad = torch.bmm(rows_dz, taps_outer_weights(w).expand(n, -1, -1))  # [N, pixels, k*k*Cin]
        cols_grad = cols_grad.view(n, -1, k, k, cin).permute(0, 4, 2, 3, 1).reshape(n, cin * k * k, -1)
        dx = F.fold(cols_grad, (h, width), k, padding=1).contiguous(memory_format=ops.memory_format_of(x))
    if output_mask[1]:
        cols = taps_outer_columns(x, k).reshape(-1, k * k * cin)
        dw = torch.mm(rows_dz.reshape(-1, cout).t(), cols).view(cout, k, k, cin).permute(0, 3, 1, 2)
    return dx, dw


def conv_scale_shift_relu(x, weight, scale, shift):
    """``relu(conv3x3(x, weight) * scale + shift)`` (an eval BN as per-channel vectors) as im2col and one GEMM over
    the batch's pixels against the weights as they lie (read once, however many images); the output in x's layout.
    mm, not matmul: matmul picks its kernel by requires_grad, and the bits must not depend on that."""
    n, _, h, w = x.shape
    cout = weight.shape[0]
    if ops.memory_format_of(weight) == torch.channels_last:
        product = torch.mm(taps_outer_columns(x, 3).reshape(n * h * w, -1), taps_outer_weights(weight).t())
        out = torch.addcmul(shift, product, scale).relu_()  # [N*H*W, Cout]
        return out.view(n, h, w, cout).permute(0, 3, 1, 2).contiguous(memory_format=ops.memory_format_of(x))
    columns = F.unfold(x, 3, padding=1).transpose(0, 1).reshape(weight[0].numel(), n * h * w)
    product = torch.mm(weight.reshape(cout, -1), columns)  # [Cout, N*H*W]
    out = torch.addcmul(shift.view(-1, 1), product, scale.view(-1, 1)).relu_()
    return out.view(cout, n, h, w).permute(1, 0, 2, 3).contiguous(memory_format=ops.memory_format_of(x))


def shifted_backward(dz, x, w, output_mask):
    """(dx, dw) of the sub-pixel conv ``conv2d(x, w, padding=1)`` (x ``[N, Cin, h, w]`` channels_last, w
    ``[Cout, Cin, 2, 2]``, dz ``[N, Cout, h+1, w+1]``), each None where ``output_mask`` says so: four GEMMs per
    gradient over the pixels as rows. With x zero-padded to an ``(h+2) x (w+2)`` grid and dz zero-extended to the
    same grid, tap (a, b) pairs row r of dz with row r + a(w+2) + b of x, within one image; the zero rows add
    nothing. dw comes taps outermost, as subpixel.phase_weights_backward reads it best."""
    n, cin, h, width = x.shape
    cout = w.shape[0]
    grid_dz = dz.new_zeros((n, h + 2, width + 2, cout))
    grid_dz[:, :h + 1, :width + 1] = dz.permute(0, 2, 3, 1)
    rows_dz = grid_dz.view(-1, cout)
    taps = [(a, b, a * (width + 2) + b) for a in range(2) for b in range(2)]
    length = rows_dz.shape[0]
    dx = dw = None
    if output_mask[0]:
        grid_dx = x.new_zeros((n, h + 2, width + 2, cin))
        rows_dx = grid_dx.view(-1, cin)
        for a, b, shift in taps:
            rows_dx[shift:].addmm_(rows_dz[:length - shift], w[:, :, a, b])
        dx = grid_dx[:, 1:h + 1, 1:width + 1].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    if output_mask[1]:
        grid_x = x.new_zeros((n, h + 2, width + 2, cin))
        grid_x[:, 1:h + 1, 1:width + 1] = x.permute(0, 2, 3, 1)
        rows_x = grid_x.view(-1, cin)
        dw_taps = x.new_empty((2, 2, cout, cin))
        for a, b, shift in taps:
            torch.mm(rows_dz[:length - shift].t(), rows_x[shift:], out=dw_taps[a, b])
        dw = dw_taps.permute(2, 3, 0, 1)
    return dx, dw
