"""Weights derived for CPU inference (Winograd's transformed weights, BN scale folded in), kept between calls.

Inference with the same weights call after call makes the same derived weights each time: for a 1 x 3 x 256 x 256
U-Net inference on 2 cores, Winograd's weight transforms took about 9% of the time. ``lookup`` keeps them, keyed
by the weight tensor (held weakly: an entry goes with its weight), and checks at every call, bit for bit, that the
tensors they derive from are still what they were made from: a copy of each is kept and compared (a sixth of a
transform's time). So every write is seen, ``.data`` writes and swapped tensors included, which a version counter
would miss.

An entry is made at the second call with the same weight tensor (weights made anew at every call, by a
parametrization say, never pay for one), and made anew when the tensors changed (an optimizer step between
validations, or one weight shared by two layers with different BNs). It costs a copy of the weight and the derived
tensor: for a U-Net at 256 x 256, 366 MB (2.65x its parameters; 52 MB at 64 x 64, where the deep levels run as
GEMMs), while the model runs inference: fast-mode training frees its layers' entries (``forget``). ``clear`` frees
every entry; ``enabled = False`` uses and keeps none from then on (each call makes its derived weights anew, in a
per-thread workspace).
"""

import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["lookup", "forget", "clear", "enabled"]

enabled = True

_lock = threading.Lock()
_entries = WeakIdKeyDictionary()  # weight -> {kind: _Derived, or None after the first call}


def _bits(t):
    """t's elements as integers of their size: equal bits compare equal (NaNs, -0.0 and 0.0 told apart)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_layout(a, b):
    return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.stride() == b.stride()


class _Derived:
    """A derived tensor and copies of the tensors it was made from."""

    def __init__(self, sources, tensor):
        self.sources = tuple(s.clone() for s in sources)
        self.tensor = tensor

    def matches(self, sources):
        return all(_same_layout(s, c) and torch.equal(_bits(s), _bits(c)) for s, c in zip(sources, self.sources))


def lookup(kind, sources, make):
    """The tensor ``make(*sources)`` would return, kept from an earlier call with the same ``sources[0]`` tensor
    where every source still has the bits it had then, else made anew and kept; None at the first call with that
    tensor (the caller makes it its own way) and whenever ``enabled`` is False. A kept tensor is never written
    again (another thread may still be reading it). Call under torch.no_grad()."""
    if not enabled:
        return None
    weight = sources[0]
    with _lock:
        per_weight = _entries.setdefault(weight, {})
        if kind not in per_weight:
            per_weight[kind] = None
            return None
        entry = per_weight[kind]
        if entry is None or not entry.matches(sources):
            entry = per_weight[kind] = _Derived(sources, make(*sources))
        return entry.tensor


def forget(*weights):
    """Frees what is kept for these weight tensors. Fast-mode training calls it for the convs it runs, so that weights
    changing at every step hold no stale derived tensors (in a loop of training and validation, the memory of the
    kept weights is the validation's alone). Takes no lock while nothing is kept (CUDA training, say)."""
    if not _entries:
        return
    with _lock:
        for weight in weights:
            _entries.pop(weight, None)


def clear():
    """Frees every kept derived tensor."""
    with _lock:
        _entries.clear()
