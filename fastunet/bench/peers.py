"""The ``--peers`` rows: other runtimes of the reference U-Net, inference only, timed and checked against the float64
reference as the configs are."""

import contextlib
import os
import sys
import tempfile
import time
import warnings

import torch

from ..testing import relative_error
from .configs import build_model
from .timing import median_ms, progress

# Rows of ``--peers``: other runtimes of the reference U-Net, inference only.
PEERS = {"reference_onnxruntime": "reference ONNX Runtime"}


def onnxruntime_refusal(device):
    """Why the ONNX Runtime row cannot be measured on ``device``, or None."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "skipped: onnxruntime is not installed (pip install onnxruntime onnxscript)"
    if device.type != "cpu":
        return "skipped: measured with ONNX Runtime's CPU provider, on the CPU only"
    return None


def onnxruntime_session(model, x):
    """An ONNX Runtime CPU session of ``model`` exported (torch.onnx.export, dynamo) at ``x``'s shape."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        path = os.path.join(folder, "unet.onnx")
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=True)
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def measure_onnxruntime(config, state, batches, exact_step, device, warmup, reps, channels_last):
    """Inference time and error of the reference exported to ONNX in ONNX Runtime (no training step; its first
    call counts the export and the session set-up)."""
    label = PEERS[config]
    progress(f"{label}: export to ONNX, session, first inference, error vs float64")
    model = build_model("reference_eager", device, channels_last, state).eval()
    start = time.perf_counter()
    session = onnxruntime_session(model, batches[0][0])

    def infer(x, target):
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])

    out = infer(*batches[0])
    result = {"config": config, "label": label, "first_train_s": None, "first_infer_s": time.perf_counter() - start,
              "infer_rel_err": relative_error(out, exact_step.infer_out)}
    progress(f"{label}: inference, {warmup} warm-up + {reps} timed")
    result["infer_ms"] = median_ms(infer, batches, warmup, reps, device)
    return result


def measure_peers(args, device, state, batches, exact_step, warmup, reps):
    """The ``--peers`` rows: measured, or skipped with why."""
    config, label = next(iter(PEERS.items()))
    refusal = onnxruntime_refusal(device) or (args.dtype != "float32" and "skipped: the export is float32")
    if refusal:
        progress(f"{label}: {refusal}")
        return [{"config": config, "label": label, "skipped": refusal}]
    return [measure_onnxruntime(config, state, batches, exact_step, device, warmup, reps, args.channels_last)]
