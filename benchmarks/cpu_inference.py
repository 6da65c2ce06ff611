"""Fast-mode CPU inference side by side, interleaved in one process: the seed U-Net eager, fastunet fast's CPU
inference path (blocks.inference._cpu_inference: BN folded into the convs where that pays, the sub-pixel up-conv from
32 x 32 low-resolution pixels up) and fastunet fast through its Functions (the path before), with each one's
relative error against a float64 run of the seed U-Net. The BN running stats are those of the input (as
bench.initial_state makes them): the initial (0, 1) ones shrink the activations into denormal floats, which run
several times slower on a CPU and flatter whichever path meets fewer of them.

  python benchmarks/cpu_inference.py [--size 256] [--batch 1] [--channels-last] [--reps 7]
"""

import argparse
import copy

import torch

import fastunet
from fastunet.bench import initial_state, interleaved_median_ms
from fastunet.blocks import inference
from fastunet.reference import U_Net as Reference
from fastunet.testing import relative_error


def through_functions(model, x):
    """``model(x)`` with the CPU inference path switched off."""
    enabled, inference._CPU_INFERENCE = inference._CPU_INFERENCE, False
    try:
        return model(x)
    finally:
        inference._CPU_INFERENCE = enabled


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=memory_format)
    state = initial_state([(x, None)], x.device)  # running stats of real activations, away from denormals
    reference = Reference(3, 1).eval().to(memory_format=memory_format)
    fast = fastunet.U_Net(3, 1).eval().to(memory_format=memory_format)
    for model in (reference, fast):
        model.load_state_dict(state)
    runs = {"seed U-Net eager": lambda: reference(x), "fastunet fast, CPU path": lambda: fast(x),
            "fastunet fast, Functions": lambda: through_functions(fast, x)}
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double())
        errors = {name: relative_error(run(), exact) for name, run in runs.items()}
        times = interleaved_median_ms(runs, args.reps)
    base = times["seed U-Net eager"]
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.batch} x 3 x {args.size} x "
          f"{args.size} float32, {'channels_last' if args.channels_last else 'NCHW'}, medians of {args.reps}")
    for name, ms in times.items():
        print(f"{name:26s} {ms:9.1f} ms  {base / ms:5.2f}x  error vs float64 {errors[name]:.2e}")


if __name__ == "__main__":
    main()
