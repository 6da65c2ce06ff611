"""The fused blocks' differentiable backward: where autograd records the backward (double backward,
torch.func), the seed's pure-PyTorch layers run again and autograd differentiates them."""


import torch
import torch.nn.functional as F


def _reference_layer(x, w, b, bn, conv_dtype, inplace_relu=False):
    """One conv3x3 + BN + ReLU layer with the seed's pure-PyTorch ops, convs in ``conv_dtype`` (autocast's
    casts), leaving the running stats alone; the ReLU in place (the seed's ``nn.ReLU(inplace=True)``) if asked."""
    z = F.conv2d(x.to(conv_dtype), w.to(conv_dtype), None if b is None else b.to(conv_dtype), padding=1)
    running_mean, running_var = (None, None) if bn.training else (bn.running_mean, bn.running_var)
    y = F.batch_norm(z, running_mean, running_var, bn.weight, bn.bias, bn.training, 0.0, bn.eps)
    return torch.relu_(y) if inplace_relu else torch.relu(y)


def _differentiable_backward(ctx, reference, inputs, grad_outputs):
    """The Function's input gradients as ``reference(*inputs)``'s vector-Jacobian product, recorded by autograd:
    the backward of a fused block when autograd records the backward itself (double backward, torch.func). The
    seed's pure-PyTorch ops run again and autograd (torch.func.vjp, which nests in transforms) differentiates
    them, so the gradients are differentiable in turn. Fast mode on the CPU runs them in NCHW whatever the layout
    (the model's channels_last inside included): the seed's double backward in channels_last had 3-4x the error
    of its NCHW one against float64 (oneDNN's convs). Returns one entry per Function input."""
    need = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
    grads = [None] * len(ctx.needs_input_grad)
    if not need:
        return grads
    nchw = not ctx.exact and ctx.device_type == "cpu"

    def run(*primals):
        args = list(inputs)
        for i, primal in zip(need, primals):
            args[i] = primal
        if nchw:
            args = [a.contiguous() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]
        return reference(*args)

    outputs, vjp = torch.func.vjp(run, *(inputs[i] for i in need))
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outputs, grad_outputs))
    for i, g in zip(need, vjp(cotangents)):
        grads[i] = g
    return grads


def _check_double_backward_unsynchronized(*bns):
    if any(bn.group is not None and bn.training for bn in bns):
        raise NotImplementedError("fastunet: double backward (create_graph=True) and torch.func transforms are not "
                                  "supported through synchronized BatchNorm (nor are they by nn.SyncBatchNorm)")


# ----------------------------------------------------------------------------------------------------
# Double block
# ----------------------------------------------------------------------------------------------------
