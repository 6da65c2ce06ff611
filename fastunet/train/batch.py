"""How a batch enters the model, in the loop and in the pipeline runner alike: on the device (channels_last
with ``--channels-last``), under the autocast that ``--amp`` asks."""

import contextlib

import torch


def autocast(device, amp):
    """The autocast context of ``amp``: none, bfloat16 or float16 on ``device``'s type."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(x, device, channels_last):
    """``x`` on ``device``, in channels_last if asked (the model's memory format)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
