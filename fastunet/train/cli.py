"""Trains the reference U-Net or fastunet.U_Net on binary segmentation, and compares the two.

``python -m fastunet.train`` trains one model (``--model fastunet`` or ``reference``) on a built-in synthetic
set (SyntheticShapes: filled discs, rectangles and triangles on a noisy gradient, generated on the fly from
``(seed, index)``) or on a folder with ``images/`` and ``masks/`` (ImageMaskFolder), with Adam on BCE-with-logits
plus soft-Dice loss (``--loss bce`` for BCE alone). Each epoch ends with Dice and IoU on a held-out validation
split (model.eval(), sigmoid > 0.5) and a checkpoint. It runs in one process or under ``torchrun`` (DDP with a
DistributedSampler; ``--sync-bn`` for synchronized BatchNorm; rank 0 alone logs and writes). ``--pipeline N``
cuts fastunet.U_Net into pipeline stages over N processes (fastunet.parallel, ``--microbatches``,
``--pp-schedule``), the torchrun processes forming replicas of N trained data-parallel (PipelinedUNet); each
process builds only its own stages' parameters. ``--spatial N`` splits each image by rows over N processes
(fastunet.parallel.spatial: each holds a stripe of every activation), the replicas of N trained data-parallel.

``--compare`` builds the reference U-Net once under ``--seed``, loads its state_dict into fastunet.U_Net, trains
both on the same data in the same order with the same hyperparameters, and prints their final losses, Dice, IoU,
time per step, and the gap of the final losses against the noise of a final loss (see compare_losses).

Outputs in ``--out``: ``checkpoint.pt`` (``checkpoint_<model>.pt`` with ``--compare``: the model's state_dict,
which loads strictly into fastunet.reference.U_Net, plus optimizer, epoch, args and losses), ``history.json``
(per-step losses and per-epoch metrics of each model) and ``loss.png`` (the loss curves).
"""

import argparse
import contextlib
import copy
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

import fastunet

from .. import parallel, reference, spatial

OUTPUT_CH = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FINAL_FRACTION = 0.2  # the final loss is the mean of the last 20% of the steps
PROGRESS_INTERVAL_S = 0.1
START = time.perf_counter()


def log(message, rank=0):
    """One line on stderr (rank 0 only), flushed at once, with the seconds since the start."""
    if rank == 0:
        print(f"[train {time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def _check_size(size):
    if size <= 0 or size % 16:
        raise ValueError(f"size must be a positive multiple of 16 (four 2x2 max-pools in the U-Net), got {size}")


def _standardise(image):
    """Per-image zero mean, unit standard deviation (float32 ``[C, H, W]``)."""
    return (image - image.mean()) / image.std().clamp_min(1e-3)


class SyntheticShapes(Dataset):
    """Images of 1-3 filled shapes (discs, rectangles, equilateral triangles) and the masks of their union.

    Item ``i`` is a pair ``(image, mask)``: image float32 ``[img_ch, size, size]`` (a per-channel colour gradient
    plus Gaussian noise, shapes in colours that differ from the background by 0.35-0.75 per channel, then
    standardised per image), mask float32 ``[1, size, size]`` of 0 and 1, never empty. It is drawn with a
    torch.Generator seeded from ``(seed, i)`` alone: the same on every call, process and DataLoader worker. The
    generator keeps 32 bits of its seed: item i gets ``(seed * 0x9E3779B9 + i) mod 2**32``, distinct for the items of
    one seed, and for seeds up to 100 apart at least 2 * 10**7 items away from the other seed's.
    """

    def __init__(self, length, size=64, img_ch=3, seed=0):
        _check_size(size)
        if length < 0 or img_ch < 1:
            raise ValueError(f"need length >= 0 and img_ch >= 1, got length={length}, img_ch={img_ch}")
        self.length, self.size, self.img_ch, self.seed = length, size, img_ch, seed
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self.yy, self.xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {self.length}")
        index %= self.length
        gen = torch.Generator().manual_seed((self.seed * 0x9E3779B9 + index) & 0xFFFFFFFF)

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(shape, generator=gen)

        xx, yy, ch = self.xx, self.yy, self.img_ch
        base = uniform(0.2, 0.8, ch, 1, 1)
        angle = uniform(0, 2 * math.pi)
        ramp = xx * torch.cos(angle) + yy * torch.sin(angle)
        image = base + uniform(-0.3, 0.3, ch, 1, 1) * (ramp - ramp.mean())
        union = torch.zeros(self.size, self.size, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            kind = int(torch.randint(0, 3, (), generator=gen))
            cx, cy = uniform(0.2, 0.8), uniform(0.2, 0.8)
            if kind == 0:
                shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= uniform(0.1, 0.25) ** 2
            elif kind == 1:
                shape = ((xx - cx).abs() <= uniform(0.08, 0.25)) & ((yy - cy).abs() <= uniform(0.08, 0.25))
            else:
                shape = self._triangle(cx, cy, uniform(0.12, 0.3), uniform(0, 2 * math.pi))
            sign = torch.where(torch.rand(ch, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
            colour = base + sign * uniform(0.35, 0.75, ch, 1, 1)
            image = torch.where(shape, colour, image)
            union |= shape
        image = image + 0.05 * torch.randn(image.shape, generator=gen)
        return _standardise(image), union.float().unsqueeze(0)

    def _triangle(self, cx, cy, radius, rotation):
        """The equilateral triangle with circumradius ``radius`` around ``(cx, cy)`` (contains its incircle)."""
        angles = rotation + torch.arange(3) * (2 * math.pi / 3)
        vx, vy = cx + radius * torch.cos(angles), cy + radius * torch.sin(angles)
        inside = torch.ones_like(self.xx, dtype=torch.bool)
        for i in range(3):
            j = (i + 1) % 3
            inside &= (vx[j] - vx[i]) * (self.yy - vy[i]) - (vy[j] - vy[i]) * (self.xx - vx[i]) >= 0
        return inside


def _image_files(folder):
    """stem -> path of the png/jpg files in ``folder``."""
    files = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in files:
                raise ValueError(f"two files named {stem} in {folder}: {os.path.basename(files[stem])} and {entry}")
            files[stem] = os.path.join(folder, entry)
    return files


def _read_image(path):
    """The file as float32 ``[C, H, W]`` in [0, 1] (PIL if installed, else matplotlib.image.imread)."""
    import numpy as np

    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image

        array = matplotlib.image.imread(path)
    else:
        with Image.open(path) as image:
            if image.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I", "F"):  # palette, 1-bit, CMYK, ...
                image = image.convert("RGB")
            array = np.array(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.dtype.kind in "ui":  # 16-bit PNGs (PIL modes I;16 and I)
        array = array / 65535.0
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _to_channels(image, channels, path):
    """``[C, H, W]`` -> ``[channels, H, W]``: alpha dropped, grey repeated, colours averaged for one channel."""
    if image.shape[0] == channels:
        return image
    colour = image[:3] if image.shape[0] >= 3 else image[:1]  # RGB(A) or L(A): alpha dropped
    if channels == 1:
        return colour.mean(0, keepdim=True)
    if colour.shape[0] == 1:
        return colour.expand(channels, -1, -1)
    if colour.shape[0] == channels:
        return colour
    raise ValueError(f"{path} has {image.shape[0]} channels; cannot make the {channels} channels asked (--img-ch)")


def _resize_crop(image, size):
    """``[C, h, w]`` -> ``[C, size, size]``: shorter side resized to ``size`` (bilinear, antialiased), centre crop."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image.unsqueeze(0), size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=True).squeeze(0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top:top + size, left:left + size]


class ImageMaskFolder(Dataset):
    """Pairs ``root/images/<stem>.png|jpg`` with the mask of the same stem in ``root/masks/``.

    Item ``i`` (files in stem order) is ``(image, mask)``: image float32 ``[img_ch, size, size]`` standardised
    per image, mask float32 ``[1, size, size]`` of 0 and 1. Files are read with PIL if installed, else with
    matplotlib.image.imread, scaled to [0, 1] (8-bit by 255, 16-bit by 65535), resized so that the shorter side
    is ``size`` (bilinear, antialiased) and centre-cropped to a square. Images: alpha is dropped, grey repeated to
    ``img_ch`` channels, colours averaged for ``img_ch=1``. Masks: colours averaged, foreground where > 0.5.
    """

    def __init__(self, root, size=64, img_ch=3):
        _check_size(size)
        self.root, self.size, self.img_ch = root, size, img_ch
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder} is missing: a data folder holds images/ and masks/, with a mask "
                                        f"of the same file name (stem) for every image")
        images, masks = _image_files(image_dir), _image_files(mask_dir)
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
        missing = sorted(set(images) - set(masks))
        if missing:
            listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} of the {len(images)} images in {image_dir} have no mask of the same "
                             f"stem in {mask_dir}: {listed}")
        self.pairs = [(images[stem], masks[stem]) for stem in sorted(images)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, mask_path = self.pairs[index]
        image, mask = _read_image(image_path), _read_image(mask_path)
        if image.shape[1:] != mask.shape[1:]:
            raise ValueError(f"{image_path} is {tuple(image.shape[1:])} but its mask {mask_path} is "
                             f"{tuple(mask.shape[1:])} (H, W)")
        image = _resize_crop(_to_channels(image, self.img_ch, image_path), self.size)
        mask = _resize_crop(_to_channels(mask, 1, mask_path), self.size)
        return _standardise(image), (mask > 0.5).float()


def segmentation_loss(logits, target, kind="bce_dice"):
    """The training loss of ``logits`` ``[N, 1, H, W]`` against a 0/1 ``target`` of the same shape, in float32.

    ``"bce"``: BCE-with-logits, mean over all pixels. ``"bce_dice"``: that plus the soft-Dice loss
    ``1 - mean_n (2 sum(p t) + 1) / (sum p + sum t + 1)`` with ``p = sigmoid(logits)``, sums over each sample.
    Returns a 0-dim tensor.
    """
    logits, target = logits.float(), target.float()
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce":
        return loss
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    soft_dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return loss + 1 - soft_dice.mean()


def dice_iou_per_sample(logits, target, eps=1e-6):
    """Dice and IoU of each sample: two float32 ``[N]`` tensors; see dice_iou."""
    pred = (logits.detach() > 0).flatten(1).float()  # sigmoid(logits) > 0.5
    true = (target.detach() > 0.5).flatten(1).float()
    inter = (pred * true).sum(1)
    total = pred.sum(1) + true.sum(1)
    return (2 * inter + eps) / (total + eps), (inter + eps) / (total - inter + eps)


def dice_iou(logits, target, eps=1e-6):
    """Dice and IoU of the predictions ``sigmoid(logits) > 0.5`` against a 0/1 ``target``, averaged over the batch.

    ``logits`` and ``target``: ``[N, ...]``, same shape, any float dtype. Per sample, over all its elements:
    Dice = (2|P & T| + eps) / (|P| + |T| + eps), IoU = (|P & T| + eps) / (|P | T| + eps) (an empty prediction of
    an empty target scores 1). Returns two float32 0-dim tensors on the inputs' device.
    """
    dice, iou = dice_iou_per_sample(logits, target, eps)
    return dice.mean(), iou.mean()


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


def _autocast(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to_device(x, device, channels_last):
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
            with _autocast(device, amp):
                logits = module(_to_device(x, device, channels_last))
            dice, iou = dice_iou_per_sample(logits, target.to(device))
            sums += torch.stack([dice.sum().double(), iou.sum().double(), torch.tensor(len(dice), device=device)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    module.train()
    dice, iou, count = sums.tolist()
    return dice / max(count, 1), iou / max(count, 1)


def save_checkpoint(path, model, optimizer, epoch, history, args):
    """Writes ``path`` (via a temporary file): the unwrapped model's state_dict on the CPU, optimizer, epoch,
    args, per-step losses and per-epoch metrics."""
    module = getattr(model, "module", model)
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    _write_checkpoint(path, state, optimizer.state_dict(), epoch, history, args)


def _write_checkpoint(path, model_state, optimizer_state, epoch, history, args):
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


class PipelinedUNet:
    """A fastunet.U_Net trained as pipeline stages over a (pp x dp) mesh of torchrun processes (``--pipeline``).

    ``local``: this rank's LocalPipeline (fastunet.parallel.build_pipeline); ``pp_group``: the ranks of its
    pipeline, ``dp_group``: the ranks holding its stages in the other replicas (None without data parallelism).
    train() drives it as it drives a module: ``parameters()`` are this rank's stages' only; ``step`` runs one
    pipeline step over the schedule's micro-batches; evaluate and the checkpoint go through the pipeline too.
    """

    def __init__(self, local, pp_group, dp_group):
        self.local, self.pp_group, self.dp_group = local, pp_group, dp_group
        self.replicas = 1 if dp_group is None else dist.get_world_size(dp_group)

    def parameters(self):
        return [p for module in self.local.modules for p in module.parameters()]

    def train(self, mode=True):
        for module in self.local.modules:
            module.train(mode)

    def eval(self):
        self.train(False)

    def run(self, x, target, device, *, amp, channels_last, training):
        """One step of the schedule (``training``) or a forward-only pass on a batch; returns (the logits on the
        rank holding the last stage, else None; the micro-batches' losses there, else [])."""
        losses = []
        args = (_to_device(x, device, channels_last),) if self.local.first else ()
        kwargs = {"target": target.to(device), "losses": losses} if self.local.last else {}
        with _autocast(device, amp):
            out = (self.local.schedule.step if training else self.local.schedule.eval)(*args, **kwargs)
        return out, losses

    def step(self, optimizer, x, target, device, *, amp, channels_last):
        """One optimizer step on a batch (the schedule averages the gradients over the micro-batches, DDP over
        the replicas); returns the mean of the micro-batches' losses, averaged over the replicas (a float)."""
        optimizer.zero_grad(set_to_none=True)
        _, losses = self.run(x, target, device, amp=amp, channels_last=channels_last, training=True)
        optimizer.step()
        value = torch.stack(losses).float().mean() if losses else torch.zeros((), device=device)
        dist.all_reduce(value)  # one rank per replica holds the last stage
        return (value / self.replicas).item()

    def evaluate(self, loader, device, *, amp, channels_last, batch):
        """(Dice, IoU) as evaluate() computes them, through the pipeline in eval mode. Each batch is padded to
        ``batch`` images (the training batch: the stages' message shapes are fixed by it) with copies of its last
        image, whose logits are dropped (BatchNorm in eval mode treats the images independently)."""
        if self.dp_group is not None:
            for module in self.local.modules:
                for buffer in module.buffers():
                    dist.broadcast(buffer, group=self.dp_group, group_src=0)
        self.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for x, target in loader:
                n = len(x)
                pad = batch - n
                x, padded_target = (torch.cat((t, t[-1:].expand(pad, *t.shape[1:]))) for t in (x, target))
                logits, _ = self.run(x, padded_target, device, amp=amp, channels_last=channels_last, training=False)
                if logits is not None:
                    dice, iou = dice_iou_per_sample(logits[:n], target.to(device))
                    sums += torch.stack([dice.sum().double(), iou.sum().double(),
                                         torch.tensor(n, dtype=torch.float64, device=device)])
        dist.all_reduce(sums)
        self.train()
        dice, iou, count = sums.tolist()
        return dice / max(count, 1), iou / max(count, 1)

    def save_checkpoint(self, path, optimizer, epoch, history, args):
        """save_checkpoint's file, written by rank 0 from the stages of its replica: the whole model's state_dict
        (it loads strictly into the seed U-Net) and the optimizer's state keyed by parameter name."""
        if self.dp_group is not None and dist.get_rank(self.dp_group) != 0:
            return
        model = parallel.gather_state_dict(self.local, self.pp_group)
        names = {p: name for module in self.local.modules for name, p in module.named_parameters()}
        state = {names[p]: {key: value.detach().cpu() if torch.is_tensor(value) else value
                            for key, value in optimizer.state[p].items()} for p in names if p in optimizer.state}
        parts = [None] * dist.get_world_size(self.pp_group) if model is not None else None
        dist.gather_object(state, parts, group=self.pp_group, group_dst=0)
        if model is None:
            return
        groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        optimizer_state = {"state": {k: v for part in parts for k, v in part.items()}, "param_groups": groups}
        _write_checkpoint(path, model, optimizer_state, epoch, history, args)


def train_step(model, optimizer, scaler, x, target, device, *, loss, amp, channels_last, world):
    """One optimizer step on a batch; returns its loss (a float, the mean over ranks)."""
    if isinstance(model, PipelinedUNet):
        return model.step(optimizer, x, target, device, amp=amp, channels_last=channels_last)
    x, target = _to_device(x, device, channels_last), target.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp):
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


def final_window(steps, fraction=FINAL_FRACTION):
    """How many last steps the final loss averages: ``max(2, round(fraction * steps))``, at most ``steps``."""
    return min(steps, max(2, round(fraction * steps)))


def compare_losses(reference_losses, fastunet_losses, fraction=FINAL_FRACTION):
    """Final losses of two runs, their gap, and the noise the gap is judged against.

    Over the last ``k = final_window(steps)`` steps of each run: ``final`` is the mean loss and ``noise`` the
    standard error of the difference of two such means, ``sqrt((s_ref^2 + s_fast^2) / k)`` with ``s`` the
    standard deviation of a run's last k step losses: how far apart the final losses of two runs land from
    batch-to-batch fluctuation alone (NaN from a single step). Also ``initial`` (mean of the first k steps).
    """
    steps = min(len(reference_losses), len(fastunet_losses))
    k = final_window(steps, fraction)
    ref, fast = reference_losses[:steps], fastunet_losses[:steps]
    noise = math.sqrt((statistics.variance(ref[-k:]) + statistics.variance(fast[-k:])) / k) if k > 1 else math.nan
    final_ref, final_fast = statistics.fmean(ref[-k:]), statistics.fmean(fast[-k:])
    gap = final_fast - final_ref
    return {
        "steps": steps,
        "window": k,
        "initial_reference": statistics.fmean(ref[:k]),
        "initial_fastunet": statistics.fmean(fast[:k]),
        "final_reference": final_ref,
        "final_fastunet": final_fast,
        "gap": gap,
        "relative_gap": gap / final_ref,
        "noise": noise,
        "gap_over_noise": abs(gap) / noise if noise else (math.inf if gap else 0.0),
    }


def moving_average(values, window):
    """Trailing mean over ``window`` values: (x positions 1-based, means), ``len(values) - window + 1`` of each."""
    cumulative = [0.0]
    for value in values:
        cumulative.append(cumulative[-1] + value)
    means = [(cumulative[i] - cumulative[i - window]) / window for i in range(window, len(values) + 1)]
    return list(range(window, len(values) + 1)), means


def plot_losses(histories, path, title):
    """PNG of the per-step training losses, one panel per model (shared y axis), each with its moving average
    (and, with several models, the others' moving averages dashed), final loss, Dice and IoU in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(histories)
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        history = histories[name]
        losses = history["losses"]
        window = max(1, round(len(losses) / 10))
        ax.plot(range(1, len(losses) + 1), losses, color=colours[name], alpha=0.35, linewidth=0.8, label="per step")
        ax.plot(*moving_average(losses, window), color=colours[name], linewidth=2,
                label=f"{name}, mean of {window} steps")
        for other in names:
            if other != name:
                ax.plot(*moving_average(histories[other]["losses"], window), color=colours[other], linewidth=1.2,
                        linestyle="--", label=f"{other}, mean of {window} steps")
        last = history["epochs"][-1]
        metrics = f", Dice {last['dice']:.3f}, IoU {last['iou']:.3f}" if last["dice"] is not None else ""
        ax.set_title(f"{name}: final loss {history['final_loss']:.4f}{metrics}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(histories, comparison=None):
    """Final loss (mean of the last k steps), Dice, IoU and seconds per step of each model; the gap line."""
    lines = [f"{'model':<10} {'final loss':>10} {'Dice':>7} {'IoU':>7} {'s/step':>7}"]
    for name, history in histories.items():
        last = history["epochs"][-1]
        dice, iou = (f"{last[key]:.4f}" if last[key] is not None else "n/a" for key in ("dice", "iou"))
        lines.append(f"{name:<10} {history['final_loss']:>10.4f} {dice:>7} {iou:>7} {history['step_s']:>7.3f}")
    if comparison:
        c = comparison
        lines.append(
            f"final loss = mean of the last {c['window']} of {c['steps']} steps; fastunet - reference = "
            f"{c['gap']:+.4f} ({100 * c['relative_gap']:+.1f}% of reference); noise {c['noise']:.4f}; "
            f"|gap| = {c['gap_over_noise']:.2f} x noise"
        )
    return "\n".join(lines)


def default_plan(device, data):
    """Defaults on ``device``: size, batch, epochs, steps per epoch (synthetic data), validation images, workers."""
    if device.type == "cuda":
        plan = {"size": 256, "batch": 16, "epochs": 5, "steps_per_epoch": 100, "val_samples": 64, "workers": 4}
    else:
        plan = {"size": 32, "batch": 4, "epochs": 2, "steps_per_epoch": 15, "val_samples": 16, "workers": 0}
    if data != "synthetic":
        plan.update(steps_per_epoch=None, val_samples=None)  # whole folder; 20% held out
    return plan


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fastunet.train",
        description="Train the reference U-Net or fastunet.U_Net on binary segmentation; --compare trains both.",
    )
    parser.add_argument("--model", choices=("fastunet", "reference"), default="fastunet",
                        help="the model to train (default fastunet; --compare trains both)")
    parser.add_argument("--exact", action="store_true", help="fastunet in exact mode (bit for bit the reference)")
    parser.add_argument("--compare", action="store_true",
                        help="train the reference and fastunet from the same initialisation on the same data")
    add_data_options(parser)
    parser.add_argument("--loss", choices=("bce_dice", "bce"), default="bce_dice",
                        help="BCE-with-logits plus soft Dice (default), or BCE alone")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data and its order")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available, else cpu; under torchrun "
                                         "on CUDA, cuda:LOCAL_RANK)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="autocast to bfloat16, or float16 with a GradScaler (default none: float32)")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--img-ch", type=int, default=3, help="image channels (default 3)")
    parser.add_argument("--out", default="train_out", help="folder for checkpoints, history.json and loss.png")
    parser.add_argument("--sync-bn", action="store_true", help="synchronized BatchNorm across torchrun processes "
                                                               "(with --pipeline: across the replicas of each stage)")
    parser.add_argument("--pipeline", type=int,
                        help="under torchrun: cut the U-Net into pipeline stages over N processes "
                             "(fastunet.parallel; the processes form replicas of N, trained data-parallel)")
    parser.add_argument("--microbatches", type=int,
                        help="with --pipeline: micro-batches per batch (default: the number of stages); each "
                             "BatchNorm normalises each micro-batch")
    parser.add_argument("--pp-schedule", choices=("gpipe", "1f1b", "interleaved"), default="1f1b",
                        help="with --pipeline: the torch.distributed.pipelining schedule (default 1f1b; interleaved "
                             "holds two stages per process; zbv, in fastunet.parallel, trains but torch 2.14 cannot "
                             "run it forward-only for validation)")
    parser.add_argument("--spatial", type=int,
                        help="under torchrun: split each image by rows over N processes (fastunet.parallel.spatial; "
                             "the processes form replicas of N, trained data-parallel; --size a multiple of 16 N)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none either off a terminal)")
    parser.add_argument("--log-every", type=int, default=10, help="without a progress bar, log every N steps")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default 0 on the CPU, 4 on CUDA)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def add_data_options(parser):
    """The options of the data and its amount: --data, --size, --batch, --epochs, --steps-per-epoch and the rest."""
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (shapes generated on the fly) or a folder with images/ and masks/")
    parser.add_argument("--size", type=int, help="image side, a multiple of 16 (default 32 on the CPU, 256 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size per process (default 4 on the CPU, 16 on CUDA)")
    parser.add_argument("--epochs", type=int, help="epochs (default 2 on the CPU, 5 on CUDA)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--steps-per-epoch", type=int,
                        help="synthetic: steps per epoch (default 15 on the CPU, 100 on CUDA), the training set "
                             "holds steps x batch x processes images; folder: at most this many steps per epoch")
    amount.add_argument("--train-samples", type=int, help="synthetic: training images (instead of --steps-per-epoch)")
    parser.add_argument("--val-samples", type=int,
                        help="held-out validation images (default synthetic: 16 on the CPU, 64 on CUDA; "
                             "folder: 20%%, at least 1)")


def check_args(parser, args):
    """Exits through ``parser.error`` on a size that is not a multiple of 16, a misplaced or out-of-range count."""
    if args.size is not None and (args.size <= 0 or args.size % 16):
        parser.error("--size must be a positive multiple of 16 (four 2x2 max-pools)")
    if args.data != "synthetic" and args.train_samples is not None:
        parser.error("--train-samples applies to --data synthetic only (a folder is used whole)")
    if args.pipeline is None and args.microbatches is not None:
        parser.error("--microbatches applies to --pipeline only")
    if args.pipeline is not None and (args.compare or args.model != "fastunet" or args.amp == "fp16"):
        parser.error("--pipeline trains fastunet.U_Net alone (not --compare or --model reference), in float32 or "
                     "--amp bf16 (fp16's GradScaler would skip steps on some stages and not others)")
    if args.spatial is not None and (args.compare or args.model != "fastunet" or args.pipeline is not None):
        parser.error("--spatial trains fastunet.U_Net alone (not --compare, --model reference or --pipeline)")
    if args.spatial and args.size is not None and args.size % (16 * args.spatial):
        parser.error(f"--spatial {args.spatial} splits each image into {args.spatial} stripes of a multiple of 16 "
                     f"rows: --size must be a multiple of {16 * args.spatial}")
    for name in ("batch", "epochs", "steps_per_epoch", "train_samples", "img_ch", "pipeline", "microbatches",
                 "spatial"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("val_samples", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")


def setup_distributed(device_arg):
    """(device, rank, world size). Under torchrun (LOCAL_RANK set, or WORLD_SIZE > 1) it initialises the default
    process group: nccl on CUDA (device cuda:LOCAL_RANK), gloo on the CPU. A CUDA device named by its index becomes
    the current one (as under torchrun), so that work launched on the current device (Triton's) runs there."""
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "LOCAL_RANK" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def build_datasets(args, world):
    """(training set, validation set): synthetic items [0, n) and [n, n + val), or a seeded split of the folder."""
    if args.data == "synthetic":
        n_train = args.train_samples or args.steps_per_epoch * args.batch * world
        full = SyntheticShapes(n_train + args.val_samples, args.size, args.img_ch, args.seed)
        return Subset(full, range(n_train)), Subset(full, range(n_train, len(full)))
    full = ImageMaskFolder(args.data, args.size, args.img_ch)
    n_val = args.val_samples if args.val_samples is not None else max(1, len(full) // 5)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return Subset(full, order[n_val:]), Subset(full, order[:n_val])


def build_loaders(train_set, val_set, args, device, rank, world):
    """Loaders with the data order fixed by ``args.seed``: a seeded RandomSampler, or a DistributedSampler under
    torchrun; full batches only (BatchNorm). Validation (None without images): every world-th image from ``rank``."""
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    options = {"batch_size": args.batch, "num_workers": args.workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **options)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), **options) if len(val_set) else None
    return train_loader, val_loader


def build_model(name, args, state=None):
    """fastunet.U_Net (``args.exact``) or the reference U-Net, ``img_ch`` -> 1 channel, loaded with ``state``."""
    if name == "reference":
        model = reference.U_Net(args.img_ch, OUTPUT_CH)
    else:
        model = fastunet.U_Net(args.img_ch, OUTPUT_CH, exact=args.exact)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def prepare(model, args, device, world):
    """The model on ``device`` (channels_last if asked), with synchronized BN if asked, DDP-wrapped under torchrun."""
    if args.sync_bn:  # on CUDA nn.SyncBatchNorm's own function; on the CPU (where it cannot run) its twin
        model = fastunet.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


def fill_defaults(args, device):
    """Sets the options left unset to default_plan's values for ``device`` and the data, in place."""
    plan = default_plan(device, args.data)
    for key, value in plan.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_samples:
        args.steps_per_epoch = None


def load_data(args, rank, world):
    """(training set, validation set) of build_datasets, checked to hold a batch per process, and logged."""
    train_set, val_set = build_datasets(args, world)
    if len(train_set) < args.batch * world:
        raise ValueError(f"the training split has {len(train_set)} images, fewer than one batch of {args.batch} "
                         f"per data-parallel process ({world}); lower --batch or add images")
    log(f"data: {args.data}, {len(train_set)} training and {len(val_set)} validation images of "
        f"{args.img_ch} x {args.size} x {args.size}", rank)
    return train_set, val_set


class ProcessMesh(NamedTuple):
    """The torchrun processes as replicas of one model split over several processes (``--pipeline``: a (pp x dp)
    mesh; ``--spatial``: (dp x sp)): this process's split group (its pipeline, or the ranks sharing its images'
    rows), data-parallel group (None with one replica), its replica's index and the number of replicas."""

    split_group: object
    dp_group: object
    replica: int
    replicas: int


def process_mesh(split, ranks, device, world):
    """The ProcessMesh of ``world`` processes in replicas of ``ranks``. ``split`` "pp": a DeviceMesh ("pp", "dp"),
    the ranks of one pipeline ``replica, replica + replicas, ...``; "sp": ("dp", "sp"), the ranks of one image
    consecutive (neighbouring stripes exchange halos at every conv: on one node where there are several)."""
    option = {"pp": "--pipeline", "sp": "--spatial"}[split]
    if not dist.is_initialized() or world % ranks:
        raise ValueError(f"{option} {ranks} runs under torchrun on a multiple of {ranks} processes; this run has "
                         f"{world}")
    replicas = world // ranks
    shape, names = ((ranks, replicas), ("pp", "dp")) if split == "pp" else ((replicas, ranks), ("dp", "sp"))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    dp_group = mesh.get_group("dp") if replicas > 1 else None
    return ProcessMesh(mesh.get_group(split), dp_group, mesh.get_local_rank("dp"), replicas)


def _micro_batch_loss(logits, target, *, kind, device_type):
    """segmentation_loss of one micro-batch, outside autocast as train_step computes it."""
    with torch.autocast(device_type, enabled=False):
        return segmentation_loss(logits, target, kind)


def prepare_pipelined(model, args, device, mesh):
    """A PipelinedUNet of ``model`` (a fastunet.U_Net built on the meta device under the seed): synchronized BN
    over the replicas of each stage if asked, channels_last if asked, this process's stages built and
    initialised (fastunet.parallel.build_pipeline)."""
    if args.sync_bn and mesh.dp_group is not None:
        model = fastunet.convert_sync_batchnorm(model, mesh.dp_group)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = functools.partial(_micro_batch_loss, kind=args.loss, device_type=device.type)
    batch = (args.batch, args.img_ch, args.size, args.size)  # the stages balanced for its memory (with Adam's state)
    local = parallel.build_pipeline(model, args.microbatches, loss_fn, schedule=args.pp_schedule,
                                    group=mesh.split_group, device=device, example_input=batch,
                                    dp_group=mesh.dp_group)
    return PipelinedUNet(local, mesh.split_group, mesh.dp_group)


def prepare_spatial(model, args, device, mesh):
    """``model`` on ``device`` split by rows over ``mesh.split_group`` (fastunet.parallel.spatial, taking and
    returning whole images), DDP-wrapped over the replicas (its buckets summed over the stripes and averaged over
    the replicas in one all-reduce); ``--sync-bn``: BatchNorm over every process."""
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    net = parallel.spatial(model, mesh.split_group, whole_images=True,
                           bn_group=dist.group.WORLD if args.sync_bn else None, sum_grads=mesh.dp_group is None)
    if mesh.dp_group is None:
        return net
    device_ids = [device] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, process_group=mesh.dp_group)
    # one all-reduce per bucket over every process: summed over the stripes, averaged over the replicas
    ddp.register_comm_hook(spatial.StripesAndReplicas(dist.group.WORLD, dist.get_world_size(mesh.dp_group)),
                           spatial.sum_over_stripes_hook)
    return ddp


def train_model(name, model, train_set, val_set, args, config, device, rank, world, mesh=None):
    """Trains one model of ``run`` from the seeded RNG state; its history with the final loss and checkpoint path.
    With a ProcessMesh ``mesh``, ``model`` trains as pipeline stages (``--pipeline``; built on the meta device) or
    split by rows (``--spatial``)."""
    torch.manual_seed(args.seed)  # the same global RNG state for each model (DataLoader base seeds)
    replica, replicas = (mesh.replica, mesh.replicas) if mesh else (rank, world)
    train_loader, val_loader = build_loaders(train_set, val_set, args, device, replica, replicas)
    checkpoint = os.path.join(args.out, f"checkpoint_{name}.pt" if args.compare else "checkpoint.pt")
    if mesh:
        prepared = (prepare_pipelined if args.pipeline else prepare_spatial)(model, args, device, mesh)
    else:
        prepared = prepare(model, args, device, world)
    history = train(
        prepared, train_loader, epochs=args.epochs, lr=args.lr, device=device,
        val_loader=val_loader, loss=args.loss, amp=args.amp, channels_last=args.channels_last,
        steps_per_epoch=args.steps_per_epoch, log_every=args.log_every,
        progress=not args.no_progress and sys.stderr.isatty(), name=name, checkpoint=checkpoint,
        args=config,
    )
    history["final_loss"] = statistics.fmean(history["losses"][-final_window(len(history["losses"])):])
    history["checkpoint"] = checkpoint
    return history


def write_results(result, names, args, device, world):
    """Writes history.json and loss.png, prints the table and logs what was written (rank 0's part of run)."""
    histories = result["models"]
    with open(result["history"], "w") as out:
        json.dump(result, out, indent=2)
    title = (f"{' vs '.join(names)}: {args.data} {args.img_ch}x{args.size}x{args.size}, batch {args.batch}"
             f"{f' x {world}' if world > 1 else ''}, Adam lr {args.lr:g}, {args.loss} loss, {device.type}")
    if args.compare:
        c = result["comparison"]
        title += (f"\nfinal losses (last {c['window']} steps): fastunet - reference = {c['gap']:+.4f} "
                  f"({100 * c['relative_gap']:+.1f}%), {c['gap_over_noise']:.2f} x noise {c['noise']:.4f}")
    plot_losses(histories, result["plot"], title)
    print(format_table(histories, result.get("comparison")))
    log(f"wrote {', '.join(h['checkpoint'] for h in histories.values())}, {result['history']} and "
        f"{result['plot']}")


def run(args, device, rank, world):
    """Trains the model(s) of ``args``; returns the history dict that history.json holds."""
    fill_defaults(args, device)
    names = ["reference", "fastunet"] if args.compare else [args.model]
    mesh = None
    if args.pipeline:
        args.microbatches = args.microbatches or args.pipeline * parallel.SCHEDULES[args.pp_schedule].per_rank
        if args.batch % args.microbatches:
            raise ValueError(f"--batch {args.batch} does not split into {args.microbatches} equal micro-batches")
        mesh = process_mesh("pp", args.pipeline, device, world)
    elif args.spatial:
        if args.size % (16 * args.spatial):
            raise ValueError(f"--spatial {args.spatial} needs --size a multiple of {16 * args.spatial} (stripes of a "
                             f"multiple of 16 rows); it is {args.size}")
        mesh = process_mesh("sp", args.spatial, device, world)
    config = {**vars(args), "device": str(device), "world_size": world, "models": names}
    log(f"config: {json.dumps(config)}", rank)
    if args.pipeline:
        log(f"pipeline: {args.pipeline} processes x {mesh.replicas} replicas, {args.pp_schedule} schedule, "
            f"{args.microbatches} micro-batches of {args.batch // args.microbatches}", rank)
    elif args.spatial:
        log(f"spatial: each image in {args.spatial} stripes of {args.size // args.spatial} rows x {mesh.replicas} "
            f"replicas", rank)
    if args.sync_bn and (mesh.replicas if mesh else world) == 1:
        log("--sync-bn with one replica: synchronized BN computes plain BatchNorm", rank)

    train_set, val_set = load_data(args, rank, mesh.replicas if mesh else world)
    torch.manual_seed(args.seed)
    with torch.device("meta") if args.pipeline else contextlib.nullcontext():  # a stage builds its own part
        models = {names[0]: build_model(names[0], args)}
    if args.compare:
        models["fastunet"] = build_model("fastunet", args, state=copy.deepcopy(models["reference"].state_dict()))

    os.makedirs(args.out, exist_ok=True)
    histories = {}
    for name, model in models.items():
        histories[name] = train_model(name, model, train_set, val_set, args, config, device, rank, world, mesh)

    result = {"config": config, "models": histories}
    if args.compare:
        result["comparison"] = compare_losses(histories["reference"]["losses"], histories["fastunet"]["losses"])
    result["history"], result["plot"] = os.path.join(args.out, "history.json"), os.path.join(args.out, "loss.png")
    if rank == 0:
        write_results(result, names, args, device, world)
    return result


def main(argv=None):
    """Parses ``argv``, trains (under torchrun: in every process), returns the history dict of run()."""
    args = parse_args(argv)
    device, rank, world = setup_distributed(args.device)
    try:
        return run(args, device, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

