"""How the fused blocks' autograd Functions are applied and how their flat inputs, outputs and saved tensors
are read back as NamedTuples."""


import inspect

import torch


def signature_once(function):
    """Decorates autograd Function ``function`` so that its forward's signature is made once: Function.apply binds a
    forward's arguments (it has a setup_context) by inspect.signature at every call, which then made the signature
    anew each time (~20 of the bind's ~37 us on a 2-core Sapphire Rapids)."""
    function.forward.__signature__ = inspect.signature(function.forward)
    return function


def _apply(function, *args):
    """function.apply(*args), or its forward alone when autograd has nothing to record."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.forward(*args)


def _head(flat, kind):
    """The first values of ``flat`` (a Function's outputs) as NamedTuple ``kind``, the rest left."""
    return kind._make(flat[:len(kind._fields)])


def _decode(flat, *kinds):
    """``flat`` (a Function's positional inputs, outputs or saved tensors) decoded once into one NamedTuple of each
    of ``kinds`` in turn, by their fields; all of it must be used."""
    parts, start = [], 0
    for kind in kinds:
        end = start + len(kind._fields)
        parts.append(kind._make(flat[start:end]))
        start = end
    if start != len(flat):
        raise ValueError(f"fastunet: {len(flat)} values decoded as {start}")
    return parts
