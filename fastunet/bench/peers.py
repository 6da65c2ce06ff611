"""The ``--peers`` rows: other runtimes of the reference U-Net, inference only, timed and checked against the float64
reference as the configs are: ONNX Runtime (the ONNX export, CPU provider, float32) and OpenVINO (torch.export
converted by openvino.convert_model, CPU plugin), in float32 and in OpenVINO's default precision (bf16 on a CPU with
bf16 dot products), each row naming the precision its compiled model reports."""

import contextlib
import importlib
import os
import sys
import tempfile
import time
import warnings
from typing import NamedTuple

import torch

from .configs import build_model, failure
from .timing import inference_row, progress

# Rows of ``--peers``: other runtimes of the reference U-Net, inference only. An OpenVINO row's label ends with the
# precision its compiled model runs in, e.g. "reference OpenVINO default (bf16)".
PEERS = {
    "reference_onnxruntime": "reference ONNX Runtime",
    "reference_openvino_f32": "reference OpenVINO f32",
    "reference_openvino_default": "reference OpenVINO default",
}
# The INFERENCE_PRECISION_HINT each OpenVINO row compiles with (None: OpenVINO's default for the device).
OPENVINO_PRECISION_HINTS = {"reference_openvino_f32": "f32", "reference_openvino_default": None}


def _cpu_peer_refusal(module, install, runner, device):
    """Why a CPU-only peer (``module``, installed by ``install``, run by ``runner``) cannot run on ``device``, or
    None."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"skipped: {module} is not installed ({install})"
    if device.type != "cpu":
        return f"skipped: measured with {runner}, on the CPU only"
    return None


def onnxruntime_refusal(device):
    """Why the ONNX Runtime row cannot be measured on ``device``, or None."""
    return _cpu_peer_refusal("onnxruntime", "pip install onnxruntime onnxscript", "ONNX Runtime's CPU provider",
                             device)


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

    return inference_row(config, label, infer, start, batches, exact_step, warmup, reps, device)


def openvino_refusal(device):
    """Why the OpenVINO rows cannot be measured on ``device``, or None."""
    return _cpu_peer_refusal("openvino", "pip install openvino", "OpenVINO's CPU plugin", device)


def openvino_model(model, x):
    """``model`` as an OpenVINO model: torch.export at ``x``'s shape, then openvino.convert_model."""
    import openvino

    with torch.no_grad():
        return openvino.convert_model(torch.export.export(model, (x,)))


class OpenVINOCompiled(NamedTuple):
    """An OpenVINO model compiled for the CPU, and the precision it reports running in."""

    compiled: object  # openvino.CompiledModel
    precision: str  # its INFERENCE_PRECISION_HINT: "f32", "bf16", ...


def openvino_compiled(ov_model, precision_hint):
    """OpenVINOCompiled of ``ov_model`` on the CPU plugin with INFERENCE_PRECISION_HINT ``precision_hint`` (None:
    OpenVINO's default); a RuntimeError if the compiled model reports another precision than the one asked for."""
    import openvino

    config = {} if precision_hint is None else {"INFERENCE_PRECISION_HINT": precision_hint}
    compiled = openvino.Core().compile_model(ov_model, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if precision_hint is not None and precision != precision_hint:
        raise RuntimeError(f"OpenVINO compiled in {precision} where {precision_hint} was asked for")
    return OpenVINOCompiled(compiled, precision)


def measure_openvino(config, ov_model, convert_s, batches, exact_step, device, warmup, reps):
    """Inference time and error of the reference converted to OpenVINO (``ov_model``, converted in ``convert_s``
    seconds) and compiled with the precision of ``config`` (no training step; its first call counts the conversion,
    the compilation and the first inference)."""
    progress(f"{PEERS[config]}: compile, first inference, error vs float64")
    start = time.perf_counter()
    compiled, precision = openvino_compiled(ov_model, OPENVINO_PRECISION_HINTS[config])
    request = compiled.create_infer_request()

    def infer(x, target):
        return torch.from_numpy(request.infer({0: x.contiguous().numpy()})[0])

    label = f"{PEERS[config]} ({precision})" if OPENVINO_PRECISION_HINTS[config] is None else PEERS[config]
    return inference_row(config, label, infer, start - convert_s, batches, exact_step, warmup, reps, device,
                         precision=precision)


def measure_openvino_rows(args, device, state, batches, exact_step, warmup, reps):
    """The OpenVINO rows of ``--peers`` (float32 in a float32 run only; OpenVINO's default precision in either):
    measured, or skipped with why (a conversion or compilation failure included, as the compiled configs')."""
    configs, rows = list(OPENVINO_PRECISION_HINTS), []
    if args.dtype != "float32":
        configs.remove("reference_openvino_f32")
        rows.append({"config": "reference_openvino_f32", "label": PEERS["reference_openvino_f32"],
                     "skipped": f"skipped: float32 inference, in a {args.dtype} run"})
    refusal = openvino_refusal(device)
    if refusal:
        return rows + [{"config": config, "label": PEERS[config], "skipped": refusal} for config in configs]
    progress("reference OpenVINO: torch.export, openvino.convert_model")
    try:
        start = time.perf_counter()
        model = build_model("reference_eager", device, args.channels_last, state).eval()
        ov_model = openvino_model(model, batches[0][0].contiguous())
        convert_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 (the exporter and the converter raise many kinds)
        return rows + [{"config": config, "label": PEERS[config], "skipped": failure(error)} for config in configs]
    for config in configs:
        try:
            rows.append(measure_openvino(config, ov_model, convert_s, batches, exact_step, device, warmup, reps))
        except Exception as error:  # noqa: BLE001 (OpenVINO's compiler raises many kinds)
            rows.append({"config": config, "label": PEERS[config], "skipped": failure(error)})
    return rows


def measure_peers(args, device, state, batches, exact_step, warmup, reps):
    """The ``--peers`` rows in PEERS order: measured, or skipped with why."""
    config, label = "reference_onnxruntime", PEERS["reference_onnxruntime"]
    refusal = onnxruntime_refusal(device) or (args.dtype != "float32" and "skipped: the export is float32")
    if refusal:
        rows = [{"config": config, "label": label, "skipped": refusal}]
    else:
        rows = [measure_onnxruntime(config, state, batches, exact_step, device, warmup, reps, args.channels_last)]
    rows += measure_openvino_rows(args, device, state, batches, exact_step, warmup, reps)
    for row in rows:
        if "skipped" in row:
            progress(f"{row['label']}: {row['skipped']}")
    return rows
