"""Benchmarks the reference U-Net (eager, torch.compile) against fastunet (exact, fast, and fast with
activation checkpointing, which trades time for memory) on one device.

``python -m fastunet.bench`` prints, for each configuration, the training-step time (forward + loss +
backward) and the inference time (median of timed reps after warm-up, inputs rotating among pre-drawn
random batches), the speedups over the reference in eager mode, the peak memory a step needs above the
weights and inputs it starts from, and the relative error of the training output, of the parameter gradients
and of the inference output against a float64 run of the reference on the same weights and input. On the CPU, the
fast model's inference snapshots (``fastunet.optimize_for_inference``: the run's dtype, and bfloat16 beside a
float32 run) add inference-only rows. ``--peers`` adds the reference in ONNX Runtime and in OpenVINO (float32, and
OpenVINO's default precision), inference only. It writes the results as JSON and a bar chart of the speedups into
``--out``.
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform

import torch

from .. import ops
from ..explain import explain
from ..tune import tune
from .configs import (
    COMPILED,
    CONFIGS,
    CPU_MEMORY_METHOD,
    IMG_CH,
    N_BATCHES,
    autocast_for,
    build_model,
    cpu_peak_memory,
    failure,
    float64_reference,
    initial_state,
    measure,
    memory_method,
    random_batches,
    reference_flops,
)
from .peers import measure_peers
from .snapshots import measure_snapshots
from .table import format_table, plot_speedups
from .timing import matmul_peak_tflops, peak_in_tf32, progress

CPU_QUICK_COMPILE_SKIP = (
    "skipped: torch.compile of a U-Net takes a minute or more on the CPU, over the --quick budget; "
    "run without --quick to include it"
)


def default_plan(device, quick):
    """(batch, size, warm-up calls, timed reps) for ``device``."""
    if device.type == "cuda":
        return (16, 256, 3, 5) if quick else (16, 256, 10, 30)
    return (2, 64, 2, 5) if quick else (4, 128, 3, 7)


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
                        help="add the reference in ONNX Runtime (its ONNX export, CPU provider) and in OpenVINO (CPU "
                             "plugin; float32, and OpenVINO's default precision: bf16 on a CPU with bf16 dot "
                             "products), inference only")
    parser.add_argument("--no-memory", action="store_true",
                        help="leave out the peak-memory columns (on the CPU a fresh subprocess measures them)")
    parser.add_argument("--reps", type=int, help="timed reps per config, after one warm-up call (default: by "
                                                   "device and --quick; 1 rehearses the run in the least time)")
    parser.add_argument("--out", default="bench_out", help="folder for results.json and speedup.png")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--explain", action="store_true",
                        help="first print fastunet.explain of the fast model on the bench's input (training step "
                             "and inference): each conv layer's algorithm, layout, dtype and the rule that picked it")
    parser.add_argument("--tune", action="store_true",
                        help="first time each conv layer's algorithms on this machine for the bench's input "
                             "(fastunet.tune, training step and inference) and keep the fastest in this machine's "
                             "plan, which the fast rows then run")
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
                reason = failure(error)
                progress(f"{label}: {reason}")
                results.append({"config": config, "label": label, "skipped": reason})
        else:
            results.append(measure(config, state, batches, exact_step, device, autocast, warmup, reps,
                                   args.channels_last, not args.no_memory))
    results += measure_snapshots(args, device, state, batches, exact_step, warmup, reps, "fastunet_fast" in skipped)
    return results + (measure_peers(args, device, state, batches, exact_step, warmup, reps) if args.peers else [])


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


def tune_fast_model(state, x, device, args):
    """fastunet.tune of the fast model on ``x`` (``--tune``), a training step's and inference's, under the bench's
    autocast; prints the timings, returns the plan file."""
    model = build_model("fastunet_fast", device, args.channels_last, state)
    for train in (True, False):
        progress(f"fastunet.tune ({'training step' if train else 'inference'})")
        with autocast_for(device, args.dtype)():
            tuning = tune(model, x, train=train)
        print(f"{tuning}\n", flush=True)
    return tuning.file


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
    if args.tune:
        report["tuned_plan"] = tune_fast_model(state, batches[0][0], device, args)
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
