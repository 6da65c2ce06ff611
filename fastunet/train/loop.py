"""The training loop: steps, epochs, validation (Dice and IoU), a checkpoint per epoch, progress and log lines.
train() drives a module (DDP-wrapped or not) or a distributed.PipelinedUNet alike."""

import itertools
import math
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .batch import autocast, to_device
from .checkpoint import save_checkpoint
from .distributed import PipelinedUNet
from .metrics import dice_iou_per_sample, segmentation_loss

PROGRESS_INTERVAL_S = 0.1
START = time.perf_counter()


def log(message, rank=0):
    """One line on stderr (rank 0 only), flushed at once, with the seconds since the start."""
    if rank == 0:
        print(f"[train {time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


class LineProgress:
    """Progress bar without tqdm: one stderr line rewritten with ``\\r``: name, step/total, loss, it/s."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n = total, desc, 0
        self.start = self.last = time.perf_counter()

    def update(self, loss):
        self.n += 1
        now = time.perf_counter()
        if now - self.last >= PROGRESS_INTERVAL_S or self.n == self.total:
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} loss {loss:.4f} {rate:.2f} it/s\x1b[K")
            sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


class TqdmProgress:
    """The same interface over a tqdm bar."""

    def __init__(self, total, desc, tqdm):
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="step", dynamic_ncols=True)

    def update(self, loss):
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def progress_bar(total, desc, enabled):
    """A bar with ``update(loss)`` and ``close()`` (tqdm if importable, else LineProgress), or None if disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return LineProgress(total, desc)
    return TqdmProgress(total, desc, tqdm)


def _rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def evaluate(model, loader, device, *, amp="none", channels_last=False):
    """Mean Dice and IoU (floats) of ``model`` in eval mode over ``loader``, all ranks' samples together.

    Under torch.distributed each rank evaluates its own samples (the loader holds a rank's share); BN running
    statistics are first broadcast from rank 0, so that every rank evaluates the model rank 0 saves.
    """
    if isinstance(model, PipelinedUNet):
        return model.evaluate(loader, device, amp=amp, channels_last=channels_last, batch=loader.batch_size)
    module = getattr(model, "module", model)
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # dice, iou, samples
    with torch.no_grad():
        for x, target in loader:
            with autocast(device, amp):
                logits = module(to_device(x, device, channels_last))
            dice, iou = dice_iou_per_sample(logits, target.to(device))
            sums += torch.stack([dice.sum().double(), iou.sum().double(), torch.tensor(len(dice), device=device)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    module.train()
    dice, iou, count = sums.tolist()
    return dice / max(count, 1), iou / max(count, 1)


def train_step(model, optimizer, scaler, x, target, device, *, loss, amp, channels_last, world):
    """One optimizer step on a batch; returns its loss (a float, the mean over ranks)."""
    if isinstance(model, PipelinedUNet):
        return model.step(optimizer, x, target, device, amp=amp, channels_last=channels_last)
    x, target = to_device(x, device, channels_last), target.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(x)
    value = segmentation_loss(logits, target, loss)
    scaler.scale(value).backward()
    scaler.step(optimizer)
    scaler.update()
    value = value.detach()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def train_epoch(model, loader, steps, optimizer, scaler, history, step_times, *, epoch, epochs, device, loss, amp,
                channels_last, log_every, progress, name):
    """One epoch of ``steps`` steps: appends each step's loss to ``history`` and its time to ``step_times``."""
    rank, world = _rank_and_world()
    bar = progress_bar(steps, f"{name} epoch {epoch}/{epochs}", progress and rank == 0)
    for step, (x, target) in enumerate(itertools.islice(loader, steps), 1):
        start = time.perf_counter()
        step_loss = train_step(model, optimizer, scaler, x, target, device, loss=loss, amp=amp,
                               channels_last=channels_last, world=world)
        step_times.append(time.perf_counter() - start)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{name}: the loss is {step_loss} at epoch {epoch} step {step}; "
                                     f"try a lower --lr")
        history["losses"].append(step_loss)
        if bar:
            bar.update(step_loss)
        elif log_every and step % log_every == 0:
            log(f"{name} epoch {epoch} step {step}/{steps}: loss {step_loss:.4f}", rank)
    if bar:
        bar.close()


def record_epoch(model, val_loader, history, *, epoch, epochs, steps, seconds, device, amp, channels_last, name):
    """Validates, appends the epoch's mean loss, Dice, IoU and seconds to ``history`` and logs them."""
    rank, _ = _rank_and_world()
    dice, iou = None, None
    if val_loader is not None:
        dice, iou = evaluate(model, val_loader, device, amp=amp, channels_last=channels_last)
    epoch_loss = statistics.fmean(history["losses"][-steps:])
    history["epochs"].append({"epoch": epoch, "loss": epoch_loss, "dice": dice, "iou": iou, "seconds": seconds})
    metrics = f", val Dice {dice:.4f}, IoU {iou:.4f}" if dice is not None else ""
    log(f"{name} epoch {epoch}/{epochs}: mean loss {epoch_loss:.4f}{metrics} ({seconds:.1f}s)", rank)


def train(model, loader, *, epochs, lr, device, val_loader=None, loss="bce_dice", amp="none", channels_last=False,
          steps_per_epoch=None, log_every=10, progress=True, name="model", checkpoint=None, args=None):
    """Trains ``model`` (on ``device``, DDP-wrapped or not, or a PipelinedUNet) with Adam(lr) for ``epochs`` passes
    over ``loader``.

    ``loader`` yields ``(image [N, C, H, W] float32, mask [N, 1, H, W] 0/1 float32)``; at most ``steps_per_epoch``
    batches are taken per epoch. ``loss``: see segmentation_loss. ``amp``: ``"none"``, ``"bf16"`` (autocast) or
    ``"fp16"`` (autocast and a GradScaler). After each epoch: Dice and IoU on ``val_loader`` (evaluate), one log
    line, and on rank 0 a checkpoint at ``checkpoint`` (a path; save_checkpoint, with ``args``). ``progress``
    shows a progress bar on rank 0; without one, a line every ``log_every`` steps.

    Returns the history: ``losses`` (per step, the mean over ranks), ``epochs`` (per epoch: epoch, loss, dice,
    iou, seconds) and ``step_s`` (median seconds per training step, data loading left out).
    """
    rank, world = _rank_and_world()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    steps = min(len(loader), steps_per_epoch or len(loader))
    if steps == 0:
        raise ValueError(f"{name}: the training loader yields no full batch")
    history = {"losses": [], "epochs": [], "step_s": None}
    step_times = []
    model.train()
    for epoch in range(1, epochs + 1):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        train_epoch(model, loader, steps, optimizer, scaler, history, step_times, epoch=epoch, epochs=epochs,
                    device=device, loss=loss, amp=amp, channels_last=channels_last, log_every=log_every,
                    progress=progress, name=name)
        record_epoch(model, val_loader, history, epoch=epoch, epochs=epochs, steps=steps,
                     seconds=time.perf_counter() - epoch_start, device=device, amp=amp, channels_last=channels_last,
                     name=name)
        if checkpoint and isinstance(model, PipelinedUNet):
            model.save_checkpoint(checkpoint, optimizer, epoch, history, args)
        elif checkpoint and rank == 0:
            save_checkpoint(checkpoint, model, optimizer, epoch, history, args)
    history["step_s"] = statistics.median(step_times)
    return history
