"""pytest-benchmark set-up: device and shapes, the models, rotating inputs, synchronised timing.

``pytest benchmarks/ --benchmark-only`` runs on CUDA when available (batch 16 x 3 x 256 x 256), else on
the CPU with small shapes (batch 2 x 3 x 64 x 64) and few rounds.
"""

import itertools

import pytest
import torch

from fastunet.bench import COMPILED, N_BATCHES, build_model, initial_state, random_batches

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
BATCH, SIZE = (16, 256) if ON_CUDA else (2, 64)
ROUNDS, WARMUP_ROUNDS = (20, 3) if ON_CUDA else (5, 1)
CPU_COMPILE_SKIP = "torch.compile of a U-Net takes a minute or more per graph on the CPU; benchmarked on CUDA"


def synchronize():
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def shape():
    """(batch, image side) of the whole-model input; blocks take the U-Net's shapes at that input."""
    return BATCH, SIZE


@pytest.fixture(scope="session")
def batches():
    """Pre-drawn (input, binary target) pairs of the whole-model shape."""
    torch.manual_seed(0)
    return random_batches(N_BATCHES, BATCH, SIZE, DEVICE, channels_last=False)


@pytest.fixture(scope="session")
def models(batches):
    """config name (fastunet.bench.CONFIGS) -> its model, built once, all with the same weights and
    BatchNorm statistics measured on ``batches``."""
    state = initial_state(batches, DEVICE)
    built = {}

    def model(config):
        if config in COMPILED and not ON_CUDA:
            pytest.skip(CPU_COMPILE_SKIP)
        if config not in built:
            built[config] = build_model(config, DEVICE, channels_last=False, state=state)
        return built[config]

    return model


@pytest.fixture
def timed(benchmark):
    """``timed(step, input_sets, prepare)`` benchmarks ``step(*prepare(*inputs))``.

    Each round takes the next of the pre-drawn ``input_sets`` (rotating) and runs ``prepare`` on it
    untimed; the device is synchronised before and after the timed call.
    """
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, size=SIZE)

    def run(step, input_sets, prepare=lambda *inputs: inputs):
        rotation = itertools.cycle(input_sets)

        def setup():
            args = prepare(*next(rotation))
            synchronize()
            return args, {}

        def timed_step(*args):
            step(*args)
            synchronize()

        benchmark.pedantic(timed_step, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

    return run
