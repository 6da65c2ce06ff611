"""The checkpoint file (``checkpoint.pt``): the model's state_dict (it loads strictly into
fastunet.reference.U_Net), the optimizer's state, the epoch, the run's arguments and its history so far."""

import os

import torch


def save_checkpoint(path, model, optimizer, epoch, history, args):
    """Writes ``path`` (via a temporary file): the unwrapped model's state_dict on the CPU, optimizer, epoch,
    args, per-step losses and per-epoch metrics."""
    module = getattr(model, "module", model)
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    write_checkpoint(path, state, optimizer.state_dict(), epoch, history, args)


def write_checkpoint(path, model_state, optimizer_state, epoch, history, args):
    """Writes the checkpoint of these states to ``path`` through ``path.tmp``, so that a run killed while writing
    leaves the previous epoch's checkpoint whole."""
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "epoch": epoch,
        "args": args,
        "losses": history["losses"],
        "epochs": history["epochs"],
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
