"""The CPU grid of issue 14: fastunet fast and exact against the seed U-Net eager over image sizes, batches, both
layouts, inference and training steps; the three interleaved call by call in one process (this machine's noise
moves all three alike), medians per point. Prints a markdown table, the rows slower than eager marked.

  python benchmarks/cpu_grid.py [--sizes 64,128,256] [--batches 1,4] [--phases infer,train] [--reps 5]
"""

import argparse
import contextlib
import functools

import torch

from fastunet.bench import build_model, initial_state, interleaved_median_ms, make_steps, random_batches

MODELS = {"eager": "reference_eager", "fast": "fastunet_fast", "exact": "fastunet_exact"}


def point_ms(size, batch, channels_last, phase, reps):
    """Median ms per model name at one grid point, the models' calls interleaved."""
    torch.manual_seed(size * 100 + batch)
    batches = random_batches(1, batch, size, torch.device("cpu"), channels_last)
    state = initial_state(batches, torch.device("cpu"))
    runs = {}
    for name, config in MODELS.items():
        model = build_model(config, torch.device("cpu"), channels_last, state).train(phase == "train")
        train, infer = make_steps(model, contextlib.nullcontext)
        runs[name] = functools.partial(train if phase == "train" else infer, *batches[0])
    return interleaved_median_ms(runs, reps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--phases", default="infer,train")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, medians of {args.reps} "
          "interleaved calls after one warm-up round")
    print("| phase | input | layout | eager ms | fast ms | fast | exact ms | exact |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for phase in args.phases.split(","):
        for size in map(int, args.sizes.split(",")):
            for batch in map(int, args.batches.split(",")):
                for channels_last in (False, True):
                    ms = point_ms(size, batch, channels_last, phase, args.reps)
                    cells = [f"{ms[name]:.1f} | {ms['eager'] / ms[name]:.2f}x"
                             + (" (slower)" if ms[name] > ms["eager"] else "") for name in ("fast", "exact")]
                    print(f"| {phase} | {batch} x 3 x {size}^2 | {'channels_last' if channels_last else 'NCHW'} | "
                          f"{ms['eager']:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
