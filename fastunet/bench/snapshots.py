"""The inference-snapshot rows: ``fastunet.optimize_for_inference`` of the fast model (what a CPU serving process
runs), inference only, timed and checked against the float64 reference as the configs are. "fastunet snapshot" is
the run's dtype (float32, or bfloat16 in a bfloat16 run), "fastunet snapshot bf16" the bfloat16 one beside a
float32 run."""

import time

import torch

from ..inference import optimize_for_inference
from .configs import build_model
from .timing import inference_row, progress

SNAPSHOTS = {"fastunet_snapshot": "fastunet snapshot", "fastunet_snapshot_bf16": "fastunet snapshot bf16"}


def snapshot_refusal(config, device, dtype, fast_skipped):
    """Why the snapshot row ``config`` is not measured for a ``dtype`` run on ``device``, or None."""
    if fast_skipped:
        return "skipped (fastunet_fast not in --configs)"
    if device.type != "cpu":
        return "skipped: the inference snapshot runs on the CPU only"
    if config == "fastunet_snapshot_bf16" and dtype != "float32":
        return f"skipped: in a {dtype} run the fastunet snapshot row is the {dtype} one"
    return None


def measure_snapshot(config, state, batches, exact_step, device, warmup, reps, args):
    """Inference time and error of the snapshot row ``config`` (no training step; its first call counts making the
    snapshot)."""
    label = SNAPSHOTS[config]
    dtype = torch.bfloat16 if config == "fastunet_snapshot_bf16" or args.dtype == "bfloat16" else torch.float32
    progress(f"{label}: optimize_for_inference, first inference, error vs float64")
    model = build_model("fastunet_fast", device, args.channels_last, state).eval()
    start = time.perf_counter()
    snapshot = optimize_for_inference(model, batches[0][0], dtype=dtype)

    def infer(x, target):
        return snapshot(x)

    return inference_row(config, label, infer, start, batches, exact_step, warmup, reps, device)


def measure_snapshots(args, device, state, batches, exact_step, warmup, reps, fast_skipped):
    """The SNAPSHOTS rows: measured, or skipped with why."""
    rows = []
    for config, label in SNAPSHOTS.items():
        refusal = snapshot_refusal(config, device, args.dtype, fast_skipped)
        if refusal:
            progress(f"{label}: {refusal}")
            rows.append({"config": config, "label": label, "skipped": refusal})
        else:
            rows.append(measure_snapshot(config, state, batches, exact_step, device, warmup, reps, args))
    return rows
