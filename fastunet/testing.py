"""Error measures shared by the tests, the self-test and the benchmarks: the relative error of a result against
a float64 one, and which parameter gradients are compared."""

import torch
import torch.nn as nn


def relative_error(value, exact):
    """``||value - exact|| / ||exact||`` in float64 (a Python float; tensors of any dtype and device)."""
    exact = exact.double()
    return ((value.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def parameter_grads(model):
    """Parameter name -> gradient (zeros where none was computed)."""
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
        for name, p in getattr(model, "_orig_mod", model).named_parameters()
    }


def bn_cancelled_biases(model):
    """Names of the conv biases feeding a BatchNorm: in training mode BN cancels them, so their exact
    gradient is zero and a relative error of it means nothing."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for i, (layer, after) in enumerate(zip(module, module[1:])):
                if isinstance(layer, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
                    names.add(f"{prefix}.{i}.bias")
    return names
