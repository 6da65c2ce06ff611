"""The CPU grid of issue 14: fastunet fast and exact against the seed U-Net eager over image sizes, batches, both
layouts, inference and training steps; the models interleaved call by call in one process (this machine's noise
moves them alike), medians per point. Prints a markdown table, the cells slower than eager marked. With
``--peers``, torch.compile of the seed U-Net (inductor, compiled before the timing) and, for inference, ONNX
Runtime on its export and OpenVINO (float32, and its default precision: bf16 on a CPU with bf16 dot products) join
the interleaving; with ``--bf16``, every model runs under bfloat16 autocast (ONNX Runtime and OpenVINO's float32,
float32 only, stay out).

  python benchmarks/cpu_grid.py [--sizes 64,128,256] [--batches 1,4] [--phases infer,train] [--reps 5] [--peers]
                                [--bf16] [--models fast,exact,tuned,snapshot,snapshot_bf16]
"""

import argparse
import contextlib
import functools

import torch

import fastunet
from fastunet.bench import (
    build_model,
    initial_state,
    interleaved_median_ms,
    make_steps,
    onnxruntime_refusal,
    onnxruntime_session,
    random_batches,
)
from fastunet.bench.peers import openvino_compiled, openvino_model, openvino_refusal
from fastunet.conv import policy

MODELS = {"eager": "reference_eager", "fast": "fastunet_fast", "exact": "fastunet_exact"}
PEERS = {"compile": "reference_compile"}


def _under_plan(plan, step, *args):
    with policy.use_plan(plan):
        return step(*args)


def point_ms(size, batch, channels_last, phase, reps, peers, bf16, models=tuple(MODELS)):
    """Median ms per model name at one grid point, the models' calls interleaved: eager and ``models`` (names of
    MODELS, or "tuned": fast mode under the plan fastunet.tune makes for this point, not stored; "snapshot" and
    "snapshot_bf16": fastunet.optimize_for_inference's, in inference), and with ``peers`` PEERS, ONNX Runtime and
    OpenVINO."""
    cpu = torch.device("cpu")
    torch.manual_seed(size * 100 + batch)
    batches = random_batches(1, batch, size, cpu, channels_last)
    state = initial_state(batches, cpu)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    runs = {}
    chosen = {name: config for name, config in MODELS.items() if name == "eager" or name in models}
    for name, config in {**chosen, **(PEERS if peers else {})}.items():
        model = build_model(config, cpu, channels_last, state).train(phase == "train")
        train, infer = make_steps(model, autocast)
        runs[name] = functools.partial(train if phase == "train" else infer, *batches[0])
    if "tuned" in models:
        model = build_model("fastunet_fast", cpu, channels_last, state).train(phase == "train")
        with autocast():
            plan = fastunet.tune(model, batches[0][0], train=phase == "train", save=False).plan()
        train, infer = make_steps(model, autocast)
        runs["tuned"] = functools.partial(_under_plan, plan, train if phase == "train" else infer, *batches[0])
    for name in ("snapshot", "snapshot_bf16"):
        if name in models and phase == "infer":
            dtype = torch.bfloat16 if bf16 or name == "snapshot_bf16" else torch.float32
            model = build_model("fastunet_fast", cpu, channels_last, state).eval()
            runs[name] = functools.partial(fastunet.optimize_for_inference(model, batches[0][0], dtype=dtype),
                                           batches[0][0])
    if peers and phase == "infer" and not bf16 and onnxruntime_refusal(cpu) is None:
        model = build_model("reference_eager", cpu, channels_last, state).eval()
        session = onnxruntime_session(model, batches[0][0])
        inputs = {"x": batches[0][0].contiguous().numpy()}
        runs["onnxruntime"] = functools.partial(session.run, None, inputs)
    if peers and phase == "infer" and openvino_refusal(cpu) is None:
        model = build_model("reference_eager", cpu, channels_last, state).eval()
        ov_model = openvino_model(model, batches[0][0])
        inputs = {0: batches[0][0].contiguous().numpy()}
        for hint in ([] if bf16 else ["f32"]) + [None]:
            compiled = openvino_compiled(ov_model, hint)
            name = f"openvino {compiled.precision}" + " (default)" * (hint is None)
            runs[name] = functools.partial(compiled.compiled.create_infer_request().infer, inputs)
    return interleaved_median_ms(runs, reps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--phases", default="infer,train")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peers", action="store_true",
                        help="also torch.compile, ONNX Runtime and OpenVINO (inference)")
    parser.add_argument("--bf16", action="store_true", help="every model under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--models", default="fast,exact",
                        help="fastunet's modes to time beside eager: fast, exact, tuned (fast under the plan "
                             "fastunet.tune makes for the point; run with FASTUNET_PLAN=off so that fast is untuned), "
                             "snapshot (fastunet.optimize_for_inference in the grid's dtype; inference), snapshot_bf16 "
                             "(its bfloat16 snapshot)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS) - {"", "tuned", "snapshot", "snapshot_bf16"})
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (choose from fast, exact, tuned, snapshot, "
                     "snapshot_bf16)")
    precision = "bfloat16 autocast" if args.bf16 else "float32"
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {precision}, medians of {args.reps} "
          "interleaved calls after one warm-up round (compilation and export before it)")
    print("| phase | input | layout | eager ms | other ms (speedup over eager) |")
    print("|---|---|---|---:|---|")
    for phase in args.phases.split(","):
        for size in map(int, args.sizes.split(",")):
            for batch in map(int, args.batches.split(",")):
                for channels_last in (False, True):
                    ms = point_ms(size, batch, channels_last, phase, args.reps, args.peers, args.bf16, models)
                    cells = [f"{name} {value:.1f} ({ms['eager'] / value:.2f}x"
                             + (", slower)" if value > ms["eager"] else ")")
                             for name, value in ms.items() if name != "eager"]
                    print(f"| {phase} | {batch} x 3 x {size}^2 | {'channels_last' if channels_last else 'NCHW'} | "
                          f"{ms['eager']:.1f} | {'; '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
