"""Autocast's casts of a fused block's conv arguments, done explicitly as autocast would, and their backward."""


import torch


def _autocast_dtype(device_type):
    """The dtype autocast gives a conv on ``device_type`` now, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_dtype(t, dtype):
    """The dtype autocast gives conv argument ``t`` (floating tensors other than float64 go to ``dtype``)."""
    if dtype is None or t.dtype == torch.float64 or not t.is_floating_point():
        return t.dtype
    return dtype


def _cast(t, dtype):
    """Autocast's cast of a conv argument (see _cast_dtype); None stays None."""
    if t is None or t.dtype == _cast_dtype(t, dtype):
        return t
    return t.to(_cast_dtype(t, dtype))


def _cast_copy(t, dtype):
    """_cast(t, dtype) where it makes a new tensor, else None (what a Function returns to be saved)."""
    cast = _cast(t, dtype)
    return None if cast is t else cast


def _grad_as(g, like):
    """A gradient in the dtype of the tensor (or dtype) it belongs to (the backward of autocast's cast)."""
    if g is None or like is None:
        return None
    return g.to(like if isinstance(like, torch.dtype) else like.dtype)


def _conv_dtype(x, x_cast):
    """The dtype a block's convs ran in: autocast's where it cast the input, else the input's."""
    return x.dtype if x_cast is None else x_cast.dtype
