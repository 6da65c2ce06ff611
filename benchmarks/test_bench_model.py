"""Whole U-Net: training step (forward + BCE loss + backward) and inference, one group per phase
comparing reference eager, reference torch.compile, fastunet exact and fastunet fast."""

import contextlib

import pytest

from fastunet.bench import CONFIGS, make_steps


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("phase", ["train", "inference"])
def test_model(timed, benchmark, models, batches, shape, phase, config):
    model = models(config)
    benchmark.group = f"U-Net {phase}, batch {shape[0]} x 3 x {shape[1]} x {shape[1]}"
    model.train(phase == "train")
    train, infer = make_steps(model, contextlib.nullcontext)
    timed(train if phase == "train" else infer, batches)
