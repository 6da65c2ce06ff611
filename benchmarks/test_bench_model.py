"""Whole U-Net: training step (forward + BCE loss + backward) and inference, one group per phase
comparing reference eager, reference torch.compile, fastunet exact and fastunet fast."""

import contextlib

import pytest

from fastunet.bench import CONFIGS, N_BATCHES, make_steps, random_batches


@pytest.fixture(scope="module")
def batches(device, shape):
    return random_batches(N_BATCHES, *shape, device, channels_last=False)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("phase", ["train", "inference"])
def test_model(timed, benchmark, models, batches, shape, phase, config):
    model = models(config)
    benchmark.group = f"U-Net {phase}, batch {shape[0]} x 3 x {shape[1]} x {shape[1]}"
    model.train(phase == "train")
    train, infer = make_steps(model, contextlib.nullcontext)
    timed(train if phase == "train" else infer, batches)
