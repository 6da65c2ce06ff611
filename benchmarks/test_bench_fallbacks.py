"""What honouring nn.Module habits costs: a training step and an inference with fast mode fully fused, with one
block running its own modules (a forward hook on one of its layers), and with every block doing so (a global
module hook), next to the reference with the same hooks; and, in inference, the work fast mode redoes at every
call instead of caching it (the sub-pixel weights of the four up-convs), so that writes through ``.data`` are
always seen.
"""

import contextlib

import pytest
import torch

from fastunet import functional
from fastunet.bench import make_steps

HOOKS = {
    "no hooks": lambda model: [],
    "one layer hooked (Conv3.conv[0])": lambda model: [
        model.Conv3.conv[0].register_forward_hook(lambda module, inputs, output: None)],
    "global forward hook": lambda model: [
        torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)],
}


@pytest.mark.parametrize("hooks", list(HOOKS))
@pytest.mark.parametrize("config", ["reference_eager", "fastunet_fast"])
@pytest.mark.parametrize("phase", ["train", "inference"])
def test_hooked(timed, benchmark, models, batches, shape, phase, config, hooks):
    model = models(config)
    benchmark.group = f"hooks, U-Net {phase}, batch {shape[0]} x 3 x {shape[1]} x {shape[1]}"
    model.train(phase == "train")
    handles = HOOKS[hooks](model)
    try:
        train, infer = make_steps(model, contextlib.nullcontext)
        timed(train if phase == "train" else infer, batches)
    finally:
        for handle in handles:
            handle.remove()


def test_sub_pixel_weights_made_per_call(timed, benchmark, models, batches, shape):
    """The four up-convs' sub-pixel weights, as fast-mode inference makes them at every call; compare with the
    ``hooks, U-Net inference`` group's ``fastunet_fast-no hooks`` row."""
    model = models("fastunet_fast")
    benchmark.group = f"hooks, U-Net inference, batch {shape[0]} x 3 x {shape[1]} x {shape[1]}"
    weights = [up.up[1].weight for up in (model.Up5, model.Up4, model.Up3, model.Up2)]

    def make():
        with torch.no_grad():
            for w in weights:
                functional.phase_weights(w)

    timed(lambda *unused: make(), batches)
