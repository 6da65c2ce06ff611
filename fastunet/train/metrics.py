"""The training loss, Dice and IoU, and the comparison of two runs' final losses."""

import math
import statistics

import torch
import torch.nn.functional as F

FINAL_FRACTION = 0.2  # the final loss is the mean of the last 20% of the steps


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
