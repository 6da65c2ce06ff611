"""Benchmarks the reference U-Net (eager, torch.compile) against fastunet (exact, fast, and fast with
activation checkpointing, which trades time for memory) on one device.

``python -m fastunet.bench`` prints, for each configuration, the training-step time (forward + loss +
backward) and the inference time (median of timed reps after warm-up, inputs rotating among pre-drawn
random batches), the speedups over the reference in eager mode, the peak memory a step needs above the
weights and inputs it starts from, and the relative error of the training output, of the parameter gradients
and of the inference output against a float64 run of the reference on the same weights and input. ``--peers``
adds the reference exported to ONNX in ONNX Runtime (inference only). It writes the results as JSON and a bar
chart of the speedups into ``--out``.
"""

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import U_Net, ops, reference
from ..explain import explain

CONFIGS = {
    "reference_eager": "reference eager",
    "reference_compile": "reference compile",
    "fastunet_exact": "fastunet exact",
    "fastunet_fast": "fastunet fast",
    "fastunet_fast_checkpointing": "fastunet fast ckpt",
    "fastunet_fast_compile": "fastunet fast compile",
}
COMPILED = ("reference_compile", "fastunet_fast_compile")
# Rows of ``--peers``: other runtimes of the reference U-Net, inference only.
PEERS = {"reference_onnxruntime": "reference ONNX Runtime"}
START = time.perf_counter()
IMG_CH, OUTPUT_CH = 3, 1
N_BATCHES = 3
CPU_QUICK_COMPILE_SKIP = (
    "skipped: torch.compile of a U-Net takes a minute or more on the CPU, over the --quick budget; "
    "run without --quick to include it"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated over one step, minus memory_allocated before it"
CPU_MEMORY_METHOD = "peak RSS over one step minus RSS before it, in a fresh subprocess where RSS follows live memory"
# With a fixed mmap threshold from the start, glibc maps every block of 64 KiB or more on its own and
# unmaps it when freed, so RSS tracks the tensors alive (too slow an allocator for the timings).
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def progress(message):
    """One progress line on stderr, flushed at once, with the seconds since the start."""
    print(f"[bench {time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def default_plan(device, quick):
    """(batch, size, warm-up calls, timed reps) for ``device``."""
    if device.type == "cuda":
        return (16, 256, 3, 5) if quick else (16, 256, 10, 30)
    return (2, 64, 2, 5) if quick else (4, 128, 3, 7)


def build_model(config, device, channels_last, state):
    """The model of ``config`` on ``device``, loaded with ``state``."""
    if config.startswith("reference"):
        model = reference.U_Net(IMG_CH, OUTPUT_CH)
    else:
        model = U_Net(IMG_CH, OUTPUT_CH, exact=config == "fastunet_exact",
                      checkpointing=config == "fastunet_fast_checkpointing")
    model.load_state_dict(state)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.compile(model) if config in COMPILED else model


def random_batches(count, batch, size, device, channels_last):
    """``count`` pre-drawn (random input, random binary mask) pairs."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [
        (
            torch.randn(batch, IMG_CH, size, size, device=device).contiguous(memory_format=memory_format),
            (torch.rand(batch, OUTPUT_CH, size, size, device=device) < 0.5).float(),
        )
        for _ in range(count)
    ]


def initial_state(batches, device):
    """state_dict of a fresh reference U-Net whose BatchNorm running statistics average ``batches``.

    With the initial statistics (0, 1), eval-mode activations shrink layer after layer into denormal
    floats, which run about 10x slower on a CPU; measured statistics keep them at a normal scale.
    """
    model = reference.U_Net(IMG_CH, OUTPUT_CH).to(device)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model.state_dict()


def make_steps(model, autocast):
    """The training step (forward, BCE loss, backward; returns the output) and the inference step."""

    def train(x, target):
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
        F.binary_cross_entropy_with_logits(out.to(target.dtype), target).backward()
        return out

    def infer(x, target):
        with torch.no_grad(), autocast():
            return model(x)

    return train, infer


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_s(step, batch, device):
    """Seconds the first call of ``step`` takes (compilation, autotuning and lazy set-up included)."""
    synchronize(device)
    start = time.perf_counter()
    out = step(*batch)
    synchronize(device)
    return time.perf_counter() - start, out


def median_ms(step, batches, warmup, reps, device):
    """Median time of ``step`` over ``reps`` timed calls after ``warmup`` calls, rotating ``batches``."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    synchronize(device)
    times = []
    for i in range(reps):
        batch = batches[(warmup + i) % len(batches)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            step(*batch)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(runs, reps):
    """Median ms of each zero-argument call of ``runs`` (name -> call), the calls taken in turn ``reps`` times
    after one untimed round, so that a noisy machine moves them alike (the CPU benchmarks' side-by-side timing).
    Each round starts one call later than the one before, so every call runs at every place in the round alike:
    with a fixed order, two instances of the same eager model ran 5-8% apart by place alone (benchmarks/RESULTS.md)."""
    names = list(runs)
    times = {name: [] for name in names}
    for rep in range(reps + 1):
        start = rep % len(names)
        for name in names[start:] + names[:start]:
            begin = time.perf_counter()
            runs[name]()
            if rep:
                times[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def proc_status_bytes(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_growth_mib(model, step, batch, device):
    """Peak memory of one ``step`` above what is held before it (weights, inputs), in MiB.

    CUDA: the caching allocator's peak. CPU: the peak RSS (VmHWM, reset through /proc/self/clear_refs),
    meaningful in a process started with CPU_MEMORY_ENV (see cpu_peak_memory).
    """
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(*batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        base = proc_status_bytes("VmRSS")
        step(*batch)
        peak = proc_status_bytes("VmHWM")
    return (peak - base) / 2**20


def parameter_grads(model):
    """Parameter name -> gradient (zeros where none was computed)."""
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
        for name, p in getattr(model, "_orig_mod", model).named_parameters()
    }


def bn_cancelled_biases(model):
    """Names of the conv biases feeding a BatchNorm: in training mode BN cancels them, so their exact
    gradient is zero and a relative error of it means nothing."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for i, (layer, after) in enumerate(zip(module, module[1:])):
                if isinstance(layer, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
                    names.add(f"{prefix}.{i}.bias")
    return names


class Float64Run(NamedTuple):
    """The float64 reference run the errors are measured against."""

    out: torch.Tensor  # training-step output
    grads: dict  # parameter name -> gradient
    excluded: set  # the conv biases BN cancels (bn_cancelled_biases)
    infer_out: torch.Tensor  # eval-mode output


def float64_reference(state, batch, device):
    """Float64Run of the reference on ``batch``: a training step from ``state``, then inference in eval mode."""
    model = reference.U_Net(IMG_CH, OUTPUT_CH).to(device, torch.float64)
    model.load_state_dict(state)
    train, infer = make_steps(model, contextlib.nullcontext)
    x, target = batch
    out = train(x.double(), target.double()).detach()
    grads = parameter_grads(model)
    model.load_state_dict(state)  # the step moved the running stats
    model.eval()
    return Float64Run(out, grads, bn_cancelled_biases(model), infer(x.double(), target))


def relative_error(value, exact):
    """``||value - exact|| / ||exact||`` in float64 (a Python float; tensors of any dtype and device)."""
    exact = exact.double()
    return ((value.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def measure(config, state, batches, exact_step, device, autocast, warmup, reps, channels_last, memory=True):
    """Errors, times and (CUDA, unless not ``memory``) peak memory of one config."""
    label = CONFIGS[config]
    compiling = " (torch.compile compiles on the first calls)" if config in COMPILED else ""
    progress(f"{label}: first training step{compiling}, errors vs float64")
    model = build_model(config, device, channels_last, state)
    train, infer = make_steps(model, autocast)
    first_train, out = first_call_s(train, batches[0], device)
    grad_errors = {
        name: relative_error(grad, exact_step.grads[name])
        for name, grad in parameter_grads(model).items()
        if name not in exact_step.excluded
    }
    worst_param = max(grad_errors, key=grad_errors.get)
    result = {
        "config": config,
        "label": label,
        "out_rel_err": relative_error(out.detach(), exact_step.out),
        "grad_rel_err": grad_errors[worst_param],
        "worst_grad_param": worst_param,
        "first_train_s": first_train,
    }
    del out
    progress(f"{label}: training step, {warmup} warm-up + {reps} timed")
    result["train_ms"] = median_ms(train, batches, warmup, reps, device)
    getattr(model, "_orig_mod", model).load_state_dict(state)  # the steps moved the running stats
    model.eval()
    result["first_infer_s"], infer_out = first_call_s(infer, batches[0], device)
    result["infer_rel_err"] = relative_error(infer_out, exact_step.infer_out)
    progress(f"{label}: inference, {warmup} warm-up + {reps} timed")
    result["infer_ms"] = median_ms(infer, batches, warmup, reps, device)
    if device.type == "cuda" and memory:
        progress(f"{label}: peak memory")
        result.update(measure_peak_memory(model, batches[0], device, autocast))
    return result


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


def measure_peak_memory(model, batch, device, autocast):
    """Peak memory (MiB) of a training step and of an inference call, each after one unmeasured call."""
    train, infer = make_steps(model, autocast)
    model.train()
    train(*batch)
    peaks = {"train_peak_mib": peak_growth_mib(model, train, batch, device)}
    model.eval()
    infer(*batch)
    peaks["infer_peak_mib"] = peak_growth_mib(model, infer, batch, device)
    return peaks


def cpu_memory_worker(spec):
    """The subprocess side of cpu_peak_memory: prints {config: peaks} as JSON."""
    spec = json.loads(spec)
    device = torch.device("cpu")
    torch.manual_seed(0)
    batches = random_batches(1, spec["batch"], spec["size"], device, spec["channels_last"])
    state = initial_state(batches, device)
    peaks = {}
    for config in spec["configs"]:
        model = build_model(config, device, spec["channels_last"], state)
        peaks[config] = measure_peak_memory(model, batches[0], device, autocast_for(device, spec["dtype"]))
        del model
    print(json.dumps(peaks))


def memory_method(device):
    """How peak memory is measured on ``device``, or why it is not."""
    if device.type == "cuda":
        return CUDA_MEMORY_METHOD
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        return CPU_MEMORY_METHOD
    return "n/a: on the CPU it is measured on Linux with glibc only"


def cpu_peak_memory(configs, args):
    """config -> CPU peaks, from one fresh subprocess started with CPU_MEMORY_ENV (or an error line)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    spec = {"configs": configs, "batch": args.batch, "size": args.size, "dtype": args.dtype,
            "channels_last": args.channels_last}
    worker = "import sys; from fastunet.bench import cpu_memory_worker; cpu_memory_worker(sys.argv[1])"
    run = subprocess.run(
        [sys.executable, "-c", worker, json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, **CPU_MEMORY_ENV, "PYTHONPATH": python_path},
    )
    if run.returncode:
        return None, (run.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(run.stdout.splitlines()[-1]), None


def autocast_for(device, dtype):
    """A context-manager factory: bfloat16 autocast on ``device``, or nothing for float32."""
    if dtype == "bfloat16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def reference_flops(batch, size):
    """FLOPs of the reference U-Net's training step (forward + backward) and inference on ``[batch, 3, size,
    size]``: the model FLOPs every config is credited with (counted on the meta device; 392 GFLOP per
    3 x 256 x 256 image in training)."""
    with torch.device("meta"):
        model = reference.U_Net(IMG_CH, OUTPUT_CH)
        x = torch.randn(batch, IMG_CH, size, size)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    infer = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        F.binary_cross_entropy_with_logits(out, torch.zeros_like(out)).backward()
    return counter.get_total_flops(), infer


def matmul_peak_tflops(device, dtype):
    """Measured dense matmul throughput of ``device`` in ``dtype`` (CUDA: 8192^3, mean of 10 after 3 warm-up;
    CPU: 2048^3), TF/s: the peak the model FLOPs are held against. float32 on CUDA runs in TF32 exactly where the
    convs do (peak_in_tf32), so that the peak and the convs held against it multiply alike."""
    with matmul_tf32(peak_in_tf32(device, dtype)):
        return timed_matmul_tflops(device, dtype)


def peak_in_tf32(device, dtype):
    """Whether matmul_peak_tflops measures in TF32: float32 on CUDA while ATen's float32 convs run in TF32."""
    return device.type == "cuda" and dtype == torch.float32 and ops.cudnn_conv_tf32()


@contextlib.contextmanager
def matmul_tf32(enabled):
    """torch's float32 CUDA matmuls in TF32 (``enabled``) or in float32 inside the block, as before after it."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"  # older torch: allow_tf32
    previous = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def timed_matmul_tflops(device, dtype):
    """TF/s of n x n matmuls in ``dtype`` under the current precision settings (matmul_peak_tflops's sizes)."""
    n = 8192 if device.type == "cuda" else 2048
    reps = 10 if device.type == "cuda" else 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if device.type == "cuda" else 1):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def add_model_flops(results, train_flops, peak_tflops):
    """Model TFLOP/s of each training step and its fraction of the matmul peak, in place."""
    for result in results:
        if "train_ms" in result:
            result["train_tflops"] = train_flops / (result["train_ms"] * 1e-3) / 1e12
            result["train_peak_fraction"] = result["train_tflops"] / peak_tflops


def environment(device):
    """What the numbers were measured on."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda if cuda else None,
        "tf32_convs": ops.cudnn_conv_tf32() if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "fused_ops_backend": ops.backend_for(device),
        "second_conv": ops.conv3x3_mode(),
    }


def skipped_configs(args, device):
    """config -> why it is not measured."""
    skipped = {name: "skipped (not in --configs)" for name in CONFIGS if args.configs and name not in args.configs}
    for name in COMPILED:
        if args.no_compile:
            skipped.setdefault(name, "skipped (--no-compile)")
        if args.quick and device.type == "cpu":
            skipped.setdefault(name, CPU_QUICK_COMPILE_SKIP)
    return skipped


def add_speedups(results):
    """Speedups over reference eager, in place (a row without a training step has none for it)."""
    base = results[0]
    for result in results:
        if "skipped" not in result:
            if "train_ms" in result:
                result["train_speedup"] = base["train_ms"] / result["train_ms"]
            result["infer_speedup"] = base["infer_ms"] / result["infer_ms"]


# The legend's note on the float32 CUDA peak's precision (report["matmul_tf32"]; None: not float32 on CUDA).
PEAK_PRECISION = {True: ", in TF32 as the convs", False: ", in true float32 as the convs", None: ""}
TABLE_COLUMNS = (
    ("config", "label", "{}"),
    ("train ms", "train_ms", "{:.2f}"),
    ("speedup", "train_speedup", "{:.2f}x"),
    ("infer ms", "infer_ms", "{:.2f}"),
    ("speedup", "infer_speedup", "{:.2f}x"),
    ("train TF/s", "train_tflops", "{:.2f}"),
    ("of peak", "train_peak_fraction", "{:.0%}"),
    ("train MiB", "train_peak_mib", "{:.0f}"),
    ("infer MiB", "infer_peak_mib", "{:.0f}"),
    ("out err", "out_rel_err", "{:.1e}"),
    ("grad err", "grad_rel_err", "{:.1e}"),
    ("infer err", "infer_rel_err", "{:.1e}"),
)


def table_rows(report):
    """The table's cells: the column titles, then one row per config (label and reason for a skipped one)."""
    rows = [[title for title, _, _ in TABLE_COLUMNS]]
    for result in report["configs"]:
        if "skipped" in result:
            rows.append([result["label"], result["skipped"]])
        else:
            rows.append([fmt.format(result[key]) if result.get(key) is not None else "n/a"
                         for _, key, fmt in TABLE_COLUMNS])
    return rows


def table_header(report):
    """The two lines above the table naming the device, software and input, and a blank line."""
    hardware = report["device_name"] if report["cuda"] else f"{report['device_name']}, {report['cpu_threads']} threads"
    return [
        f"device: {report['device']} ({hardware}) | torch {report['torch']} | "
        f"triton {report['triton'] or 'not installed'} | fused ops backend: {report['fused_ops_backend']}"
        f"{' | TF32 convs' if report['tf32_convs'] else ''} | double blocks' second conv: {report['second_conv']}"
        + (f" (picks: {report['second_conv_picks']})" if report.get("second_conv_picks") else ""),
        f"input: {' x '.join(map(str, report['shape']))}, {report['dtype']}"
        f"{', channels_last' if report['channels_last'] else ''} | timing: median of {report['reps']} reps "
        f"after {report['warmup']} warm-up, {N_BATCHES} rotating random batches",
        "",
    ]


def table_legend(report):
    """The lines below the table: a blank line, what each column means, and the first calls' times."""
    return [
        "",
        f"TF/s: the reference's model FLOPs of a training step ({report['train_gflop']:.0f} GFLOP) per second; "
        f"of peak: against the measured {report['dtype']} matmul peak of this device "
        f"({report['matmul_peak_tflops']:.1f} TF/s{PEAK_PRECISION[report.get('matmul_tf32')]}).",
        "speedup: over reference eager. MiB: peak memory of one step above the weights and inputs held "
        f"before it ({report['memory_method']}).",
        "err: ||x - x64|| / ||x64|| against a float64 training step of the reference on the same weights and "
        "input; grad err is the worst parameter's (conv biases feeding a BatchNorm left out: BN cancels them); "
        "infer err: the eval-mode output's, against a float64 inference.",
        "first calls, s (train / infer; compilation, export, autotuning, lazy set-up): " + ", ".join(
            f"{r['label']} {'n/a' if r['first_train_s'] is None else format(r['first_train_s'], '.1f')} / "
            f"{r['first_infer_s']:.1f}" for r in report["configs"] if "skipped" not in r
        ),
    ]


def format_table(report):
    """The side-by-side table with a header naming the set-up and a legend."""
    rows = table_rows(report)
    full_rows = [row for row in rows if len(row) == len(TABLE_COLUMNS)]
    widths = [max(len(row[i]) for row in full_rows) for i in range(len(TABLE_COLUMNS))]
    lines = table_header(report)
    for row in rows:
        if len(row) == len(TABLE_COLUMNS):
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells))
        else:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
    return "\n".join(lines + table_legend(report))


def plot_speedups(report, path):
    """Bar chart of the training and inference speedups over reference eager, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [result for result in report["configs"] if "skipped" not in result]
    positions = range(len(measured))
    width = 0.38
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    phases = ((-width / 2, "train_speedup", "training step"), (width / 2, "infer_speedup", "inference"))
    for offset, key, name in phases:
        values = [r.get(key, float("nan")) for r in measured]  # nan: no bar (a row without a training step)
        bars = ax.bar([p + offset for p in positions], values, width, label=name)
        ax.bar_label(bars, labels=["" if v != v else f"{v:.2f}x" for v in values])
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(positions), [result["label"] for result in measured])
    ax.set_ylabel("speedup over reference eager")
    ax.set_title(f"U-Net {' x '.join(map(str, report['shape']))} {report['dtype']} on {report['device_name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fastunet.bench",
        description="Reference U-Net (eager, torch.compile) vs fastunet (exact, fast): time, memory, error.",
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU: batch 2 x 3 x 64 x 64, no torch.compile; CUDA: fewer reps")
    parser.add_argument("--batch", type=int, help="batch size (default: 16 on CUDA; on the CPU 4, 2 with --quick)")
    parser.add_argument("--size", type=int,
                        help="image side, a multiple of 16 (default: 256 on CUDA; on the CPU 128, 64 with --quick)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16 runs the models under autocast")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--conv", choices=("aten", "triton", "auto"),
                        help="fast mode's second conv of each double block (sets FASTUNET_CONV): ATen's conv "
                             "(cuDNN, oneDNN) after a BN+ReLU pass; fastunet's Triton conv with the BN+ReLU in its "
                             "input load and the BN statistics in its epilogue; or the faster of the two per shape "
                             "on CUDA (default: FASTUNET_CONV, else aten)")
    parser.add_argument("--ops-backend", choices=("triton", "cuda"),
                        help="on CUDA, which kernels run the fused ops (sets FASTUNET_CUDA_BACKEND): the Triton "
                             "kernels or the compiled CUDA kernels (default: FASTUNET_CUDA_BACKEND, else triton)")
    parser.add_argument("--configs", help="comma-separated subset of the configs to measure (default: all; "
                                          "reference_eager, the speedups' base, always runs): " + ", ".join(CONFIGS))
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile rows (reference and fastunet)")
    parser.add_argument("--peers", action="store_true",
                        help="add the reference exported to ONNX in ONNX Runtime (CPU provider; inference only)")
    parser.add_argument("--no-memory", action="store_true",
                        help="leave out the peak-memory columns (on the CPU a fresh subprocess measures them)")
    parser.add_argument("--reps", type=int, help="timed reps per config, after one warm-up call (default: by "
                                                   "device and --quick; 1 rehearses the run in the least time)")
    parser.add_argument("--out", default="bench_out", help="folder for results.json and speedup.png")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--explain", action="store_true",
                        help="first print fastunet.explain of the fast model on the bench's input (training step "
                             "and inference): each conv layer's algorithm, layout, dtype and the rule that picked it")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.size is not None and args.size % 16:
        parser.error("--size must be a multiple of 16 (four 2x2 max-pools)")
    if args.configs is not None:
        args.configs = parse_configs(parser, args.configs)
    return args


def parse_configs(parser, value):
    """The config names of ``--configs`` (comma-separated), reference_eager first; a parser error on unknown ones."""
    configs = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        parser.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    return ["reference_eager"] + [name for name in configs if name != "reference_eager"]


def select_kernels(args):
    """Applies ``--conv`` and ``--ops-backend`` here and in the environment, which the memory subprocess reads."""
    if args.conv:
        os.environ["FASTUNET_CONV"] = args.conv
        ops.set_conv3x3_mode(args.conv)
    if args.ops_backend:
        os.environ["FASTUNET_CUDA_BACKEND"] = args.ops_backend
        ops.select_cuda_kernels(args.ops_backend)


def select_device(name):
    """The device of ``--device`` (default cuda if available, else cpu), made current on CUDA."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)  # the timing events record on the current device
    return device


def measure_configs(args, device, state, batches, exact_step, warmup, reps):
    """The result of every config in CONFIGS order: measured, or skipped with why (a compiler failure included)."""
    autocast = autocast_for(device, args.dtype)
    skipped = skipped_configs(args, device)
    results = []
    for config, label in CONFIGS.items():
        if config in skipped:
            progress(f"{label}: {skipped[config]}")
            results.append({"config": config, "label": label, "skipped": skipped[config]})
        elif config in COMPILED:  # a compiler failure is recorded, not fatal to the other rows
            try:
                results.append(measure(config, state, batches, exact_step, device, autocast, warmup, reps,
                                       args.channels_last, not args.no_memory))
            except Exception as error:  # noqa: BLE001 (the compiler stack raises many kinds)
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                reason = f"failed: {type(error).__name__}: {first_line}"
                progress(f"{label}: {reason}")
                results.append({"config": config, "label": label, "skipped": reason})
        else:
            results.append(measure(config, state, batches, exact_step, device, autocast, warmup, reps,
                                   args.channels_last, not args.no_memory))
    return results + (measure_peers(args, device, state, batches, exact_step, warmup, reps) if args.peers else [])


def measure_peers(args, device, state, batches, exact_step, warmup, reps):
    """The ``--peers`` rows: measured, or skipped with why."""
    config, label = next(iter(PEERS.items()))
    refusal = onnxruntime_refusal(device) or (args.dtype != "float32" and "skipped: the export is float32")
    if refusal:
        progress(f"{label}: {refusal}")
        return [{"config": config, "label": label, "skipped": refusal}]
    return [measure_onnxruntime(config, state, batches, exact_step, device, warmup, reps, args.channels_last)]


def add_cpu_peak_memory(report, results, args):
    """CPU peaks of the measured configs from the memory subprocess, in place (or why not, in the report)."""
    measured = [result for result in results if "skipped" not in result and result["config"] in CONFIGS]
    progress("peak memory: every config in one fresh subprocess")
    peaks, error = cpu_peak_memory([result["config"] for result in measured], args)
    if error:
        report["memory_method"] = f"n/a: the memory subprocess failed: {error}"
    for result in measured:
        result.update(peaks[result["config"]] if peaks else {})


def second_conv_picks():
    """The shapes for which ``--conv auto`` picked each backend so far, as one line (empty if none)."""
    picks = {}
    for (shape, cout, *_), backend in ops.conv3x3_choices().items():
        picks.setdefault(backend, []).append(f"{shape[1]}->{cout}@{shape[2]}x{shape[3]}")
    return "; ".join(f"{b}: {', '.join(v)}" for b, v in sorted(picks.items()))


def write_outputs(report, args):
    """Writes results.json and speedup.png into ``--out``, then prints the table (or the JSON)."""
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "speedup.png")
    with open(json_path, "w") as out:
        json.dump(report, out, indent=2)
    plot_speedups(report, png_path)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    progress(f"wrote {json_path} and {png_path}")


def print_explanations(state, x, device, args):
    """fastunet.explain of the fast model on ``x`` (``--explain``), a training step's and inference's, under the
    bench's autocast."""
    model = build_model("fastunet_fast", device, args.channels_last, state)
    for train in (True, False):
        with autocast_for(device, args.dtype)():
            print(f"fastunet.explain ({'training step' if train else 'inference'}):\n"
                  f"{explain(model, x, train=train)}\n", flush=True)


def main(argv=None):
    args = parse_args(argv)
    select_kernels(args)
    device = select_device(args.device)
    batch, size, warmup, reps = default_plan(device, args.quick)
    if args.reps is not None:
        warmup, reps = 1, args.reps
    args.batch, args.size = args.batch or batch, args.size or size
    report = environment(device)
    progress(f"{report['device_name']} | torch {report['torch']} | triton {report['triton']} | "
             f"fused ops backend: {report['fused_ops_backend']}")
    report.update(
        shape=[args.batch, IMG_CH, args.size, args.size], dtype=args.dtype, channels_last=args.channels_last,
        warmup=warmup, reps=reps, batches=N_BATCHES,
        memory_method="n/a: --no-memory" if args.no_memory else memory_method(device),
    )
    torch.manual_seed(0)
    batches = random_batches(N_BATCHES, args.batch, args.size, device, args.channels_last)
    state = initial_state(batches, device)
    if args.explain:
        print_explanations(state, batches[0][0], device, args)
    progress("float64 reference training step (for the errors)")
    exact_step = float64_reference(state, batches[0], device)
    results = measure_configs(args, device, state, batches, exact_step, warmup, reps)
    if device.type == "cpu" and report["memory_method"] == CPU_MEMORY_METHOD:  # not with --no-memory
        add_cpu_peak_memory(report, results, args)
    add_speedups(results)
    progress(f"{args.dtype} matmul peak of the device")
    float32_cuda = device.type == "cuda" and args.dtype == "float32"
    train_flops, infer_flops = reference_flops(args.batch, args.size)
    report.update(train_gflop=train_flops / 1e9, infer_gflop=infer_flops / 1e9,
                  matmul_peak_tflops=matmul_peak_tflops(device, getattr(torch, args.dtype)),
                  matmul_tf32=peak_in_tf32(device, getattr(torch, args.dtype)) if float32_cuda else None)
    add_model_flops(results, train_flops, report["matmul_peak_tflops"])
    report["second_conv_picks"] = second_conv_picks()
    report["configs"] = results
    write_outputs(report, args)
    return 0

