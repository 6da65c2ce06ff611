"""``fastunet.tune(model, example_input, train=False)``: times, on this machine, each algorithm a conv layer of the
model could run for this input, and keeps the fastest per layer in this machine's plan (fastunet.conv.plan), which
the policy follows from then on (``fastunet.explain`` says "tuned" for those layers).

The layers are the ones ``fastunet.explain`` walks, under the autocast in force at the call. Each decision of a layer
that has more than one algorithm (policy.recording) is timed on a fresh block of the model's kind whose conv has
the layer's facts (shapes, dtypes, layouts), its inputs and weights random: a forward (and backward where ``train``)
per algorithm, the algorithms interleaved call by call, medians of ``reps``. The candidates always include the seed's
own ATen path, so a layer's tuned choice is never slower than the seed's where it was timed.
"""

from typing import NamedTuple

import torch

from . import model as fastunet_model
from .conv import plan as stored_plan
from .conv import policy
from .explain import explain


class Timed(NamedTuple):
    """One tuned decision: the layer's facts, each algorithm's median ms, and the fastest."""

    decision: str
    layer: policy.Layer
    ms: dict
    algorithm: str


class Tuning(tuple):
    """The ``Timed`` decisions of a ``tune`` call (``file``: the plan file they went to, or None); ``str()`` is a
    table."""

    file = None

    def plan(self):
        """``{(decision, layer key): algorithm}``, as ``policy.use_plan`` takes it."""
        return {(t.decision, t.layer.key()): t.algorithm for t in self}

    def __str__(self):
        rows = []
        for t in self:
            layer = t.layer
            facts = (f"{layer.n}x{layer.cin}x{layer.h}x{layer.w} -> {layer.cout} k{layer.kernel} "
                     f"{str(layer.dtype).removeprefix('torch.')} {'NHWC' if layer.nhwc_dense else 'NCHW'}")
            timings = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(t.ms.items(), key=lambda item: item[1]))
            rows.append(f"{t.decision:<15} {facts:<40} {t.algorithm:<12} ms: {timings}")
        return "\n".join(rows + [f"plan: {self.file}"] * (self.file is not None))


def tune(model, example_input, train=False, *, reps=5, save=True):
    """Times the candidate algorithms of each conv layer of ``model`` (a fastunet.U_Net, conv_block or up_conv) for
    ``example_input`` (a training step where ``train``, else inference), and with ``save`` adds the fastest to this
    machine's plan file, which fast mode follows from then on in every process. Returns the Tuning. The model is not
    run or changed; its train/eval flags are put back."""
    if reps < 1:
        raise ValueError(f"fastunet.tune: reps must be at least 1, got {reps}")
    with policy.recording() as decisions:
        explain(model, example_input, train=train)
    timed, seen = [], set()
    for decision, layer, allowed in decisions:
        key = (decision, layer.key())
        if len(allowed) < 2 or key in seen:
            continue
        seen.add(key)
        run = _block_run(decision, layer, train)
        if run is None:
            continue
        ms = _interleaved({name: _planned_call(key, name, run) for name in allowed}, reps)
        timed.append(Timed(decision, layer, ms, min(ms, key=ms.get)))
    tuning = Tuning(timed)
    if save and timed:
        tuning.file = stored_plan.save(tuning.plan(), {(t.decision, t.layer.key()): t.ms for t in timed})
    return tuning


def _planned_call(key, algorithm, run):
    def call():
        with policy.use_plan({key: algorithm}):
            run()
    return call


def _interleaved(runs, reps):
    from .bench.timing import interleaved_median_ms

    return interleaved_median_ms(runs, reps)


def _block_run(decision, layer, train):
    """A zero-argument call of a fresh block whose conv asks ``decision`` for ``layer`` (checked by recording its
    first call): a forward, and where ``train`` a backward; None where no block reproduces the layer. A half-precision
    layer runs under autocast (as a model's would), with float32 parameters."""
    device = layer.device
    sub_pixel = decision == "train_conv" and layer.kernel == 2
    if decision == "up_conv" or sub_pixel:
        block = fastunet_model.up_conv(layer.cin, layer.cout // 4 if sub_pixel else layer.cout)
    else:
        block = fastunet_model.conv_block(layer.cin, layer.cout)
    block = block.to(device=device, memory_format=layer.weight_layout).train(train)
    half = layer.weight_dtype in (torch.bfloat16, torch.float16)
    if not half:
        block = block.to(layer.weight_dtype)
    x = torch.randn(layer.n, layer.cin, layer.h, layer.w, device=device, dtype=torch.float32 if half else layer.dtype)
    x = x.contiguous(memory_format=layer.layout).requires_grad_(train)
    context = (lambda: torch.autocast(device.type, dtype=layer.weight_dtype)) if half else torch.enable_grad

    def run():
        with context(), torch.set_grad_enabled(train):
            y = block(x)
            if train:
                y.backward(torch.randn_like(y))
                block.zero_grad(set_to_none=True)
                x.grad = None

    with policy.recording() as asked:
        run()
    if not any(d == decision and asked_layer.key() == layer.key() for d, asked_layer, _ in asked):
        return None
    return run
