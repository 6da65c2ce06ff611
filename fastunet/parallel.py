"""One U-Net over several devices on torch.distributed: the model cut into pipeline stages.

``pipeline_stages(model, num_stages)`` cuts a fastunet.U_Net into stages: each is an ``nn.Module`` holding the
model's own blocks (shared, not copied), whose forward takes and returns a tuple of tensors, the skip connections
riding along as extra tensors until the decoder level that takes them. ``build_pipeline`` makes this rank's
``torch.distributed.pipelining.PipelineStage``s of them and the schedule that runs them.
"""

import collections
import ctypes
import itertools
import platform
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .model import (
    _SEED_MODULE_TYPES,
    BOTTLENECK,
    LEVELS,
    U_Net,
    _check_input,
    has_hooks,
    level_modules,
    skip_partner,
)
from .ops import memory_format_of

BALANCES = ("memory", "flops")

# What stages are cut between: the U-Net's levels, with the bottleneck's conv block as its two conv + BN + ReLU
# layers ("Conv5.conv.0", "Conv5.conv.3", named by their first modules; as a boundary "Conv5" names the first).
# The bottleneck holds 41% of the parameters, so wherever they dominate a rank's memory a stage of the whole
# bottleneck holds more than its share; a stage that holds one of its layers runs that layer by its own modules
# (the seed's), the block's fused path needing both.
UNITS = LEVELS[:BOTTLENECK] + ("Conv5.conv.0", "Conv5.conv.3") + LEVELS[BOTTLENECK + 1:]
_SECOND_LAYER = BOTTLENECK + 1  # the unit of the bottleneck's second layer
_LAYER_MODULES = (range(0, 3), range(3, 6))  # the indices in conv_block.conv of the bottleneck's two layers


def _level(unit):
    """The level of ``unit``: its own, the bottleneck's for either of its layers. A cut before ``unit`` passes on
    the skips a cut before that level does (a cut inside the bottleneck, all four)."""
    return unit if unit <= BOTTLENECK else unit - 1


class _BottleneckLayer(nn.Module):
    """One of the bottleneck conv block's two layers (conv + BN + ReLU) as a stage holds it: the block's own modules,
    under their names in the block (its ``state_dict`` keys are the model's), run in order."""

    def __init__(self, block, layer):
        super().__init__()
        self.conv = nn.Sequential(collections.OrderedDict((str(i), block.conv[i]) for i in _LAYER_MODULES[layer]))

    def forward(self, x):
        return self.conv(x)


def bottleneck_split_refusal(model):
    """Why stages may not cut inside ``model``'s bottleneck block, or None where they may. A stage holding one of
    its layers runs that layer's modules, not the block: the block must be the seed's (a conv_block whose ``conv``
    is the Sequential of conv, BN and ReLU twice), without hooks on it or its Sequential, and no global module hook
    set (it would see the two halves, not the block)."""
    block = model.Conv5
    conv = getattr(block, "conv", None)
    if type(block) not in _SEED_MODULE_TYPES or type(conv) is not nn.Sequential or len(conv) != 6:
        return "Conv5 is not the seed's conv_block"
    if has_hooks(block) or has_hooks(conv):
        return "Conv5 or Conv5.conv has hooks, or a global module hook is set"
    return None


def _unit_modules(model, first, end):
    """(name, module) of the model's children that units ``first`` to ``end - 1`` run, in order: a unit's level's
    modules, the bottleneck as a _BottleneckLayer where the units hold one of its layers."""
    for unit in range(first, end):
        if unit in (BOTTLENECK, _SECOND_LAYER):
            both = first <= BOTTLENECK and _SECOND_LAYER < end
            if both and unit == BOTTLENECK:
                yield "Conv5", model.Conv5
            elif not both:
                yield "Conv5", _BottleneckLayer(model.Conv5, unit - BOTTLENECK)
            continue
        for name in level_modules(_level(unit)):
            yield name, getattr(model, name)


def _unit_layers(model, unit):
    """The model's modules unit ``unit`` runs: its level's children, or a bottleneck layer's conv, BN and ReLU."""
    if unit in (BOTTLENECK, _SECOND_LAYER):
        return [model.Conv5.conv[i] for i in _LAYER_MODULES[unit - BOTTLENECK]]
    return [getattr(model, name) for name in level_modules(_level(unit))]


def _unit_convs(model, unit):
    """The nn.Conv2d modules unit ``unit`` runs."""
    return [m for layer in _unit_layers(model, unit) for m in layer.modules() if isinstance(m, nn.Conv2d)]


class _ContiguousGrad(torch.autograd.Function):
    """The identity whose backward makes its gradient contiguous. A skip's gradient leaves torch.cat as a channel
    slice, which a send may refuse (gloo: "input tensor has to be contiguous") or lay out anew; a stage passes the
    skips it takes through it, so what it hands back is sendable however the schedule collects it (torch 2.14's
    PipelineStage happens to hand back the accumulated ``.grad``, which autograd already lays out contiguous)."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _skips_crossing(unit):
    """The encoder levels whose skips a cut before ``unit`` passes on (made before it, taken at or after it)."""
    level = _level(unit)
    return tuple(k for k in range(BOTTLENECK) if k < level <= skip_partner(k))


class UNetStage(nn.Module):
    """Units ``UNITS[first:end]`` (levels, the bottleneck's two layers apart) of a fastunet.U_Net as one pipeline
    stage.

    Its submodules are the model's own (the same objects, under the same names), so its ``state_dict`` keys are
    the model's keys for those levels. ``forward(h, *skips)``: ``h`` is the image for the first stage, else the
    tensor the stage before returned first; ``skips`` are the encoder outputs made before this stage and taken
    at or after it, shallowest level first (``skips_in`` names their levels). Returns ``(h, *skips)`` with the
    skips taken after it (``skips_out``; one this stage neither makes nor takes is returned as the same tensor),
    or the logits ``[N, output_ch, H, W]`` from the last stage. The tensors passed between stages are contiguous,
    as send and recv take them: ``[N, C, H, W]``, or ``[N, H, W, C]`` where the model's weights are channels_last
    (its activations then are too, and run bit for bit as in the whole model; channels_last images into an NCHW
    model run NCHW after the first stage).
    """

    def __init__(self, model, first, end):
        super().__init__()
        if not isinstance(model, U_Net):
            raise TypeError(f"fastunet.parallel cuts a fastunet.U_Net into stages, not a {type(model).__name__}")
        self.first, self.end = first, end
        self.skips_in = _skips_crossing(first)
        self.skips_out = _skips_crossing(end)
        for name, module in _unit_modules(model, first, end):
            self.add_module(name, module)
        object.__setattr__(self, "model", model)  # not a submodule: its other levels are other stages' parameters

    def unit_names(self):
        """The names of the units the stage runs (UNITS), the bottleneck as "Conv5" where it holds both layers."""
        names = list(UNITS[self.first:self.end])
        if self.first <= BOTTLENECK and _SECOND_LAYER < self.end:
            names[BOTTLENECK - self.first:_SECOND_LAYER + 1 - self.first] = ["Conv5"]
        return names

    def extra_repr(self):
        return f"levels {', '.join(self.unit_names())}"

    def train(self, mode=True):
        """As nn.Module.train, and the U-Net's own flag too (its checks and activation checkpointing read it)."""
        self.model.training = mode
        return super().train(mode)

    def _channels_last(self):
        return memory_format_of(next(self.parameters())) == torch.channels_last

    def _sent(self, t):
        """A tensor for the next stage in its wire form, contiguous as send and recv take it: channels_last
        activations (those of a channels_last model) as a copy in their NHWC order ``[N, H, W, C]``, NCHW ones as
        they are."""
        return t.permute(0, 2, 3, 1).clone() if self._channels_last() else t.contiguous()

    def _received(self, t):
        """A tensor from the stage before in its compute form (see _sent; channels_last without a copy), its
        gradient handed back contiguous."""
        t = _ContiguousGrad.apply(t)
        return t.permute(0, 3, 1, 2) if self._channels_last() else t

    def forward(self, h, *skips):
        if len(skips) != len(self.skips_in):
            levels = ", ".join(LEVELS[k] for k in self.skips_in)
            raise ValueError(f"fastunet: this pipeline stage ({self.extra_repr()}) takes the input and "
                             f"{len(self.skips_in)} skip tensors (of levels {levels}), got {len(skips)}")
        model = self.model
        if self.first == 0:
            _check_input(h, model.img_ch, next(model.parameters(), None))
        first, end = _level(self.first), _level(self.end)
        if self.first <= _SECOND_LAYER:  # the image's shape, as the bottleneck's BatchNorm check reads it
            model.check_training_batch((h.shape[0], None, h.shape[2] << first, h.shape[3] << first))
        passed = {k: t for k, t in zip(self.skips_in, skips) if skip_partner(k) >= end}
        live = {k: self._received(t) for k, t in zip(self.skips_in, skips) if k not in passed}
        if self.first:
            h = self._received(h)
        if self.first == _SECOND_LAYER or self.end == _SECOND_LAYER:
            refusal = bottleneck_split_refusal(model)
            if refusal:
                raise RuntimeError(f"fastunet: this pipeline stage runs one layer of the bottleneck block by its own "
                                   f"modules, and {refusal}; remove that, or cut the stages at Conv5 or Up5")
        if self.first == _SECOND_LAYER:  # starts with the bottleneck's second layer
            h, first = self.Conv5(h), BOTTLENECK + 1
        h = model.run_levels(first, end, h, live)  # takes its skips from live, leaves there those it makes
        if self.end == _SECOND_LAYER:  # ends with the bottleneck's first layer
            h = self.Conv5(h)
        if self.end == len(UNITS):
            return h
        return (self._sent(h), *(passed[k] if k in passed else self._sent(live[k][0]) for k in self.skips_out))


def level_costs(model, balance="memory"):
    """Each unit's (UNITS: the levels, the bottleneck's two layers apart) share of the work, as counted from the
    model's convolutions: ``"memory"``, the elements of the convolutions' outputs (what training saves per level
    scales with them), or ``"flops"``, their multiply-adds; both per input pixel, so the same for every image size."""
    if balance not in BALANCES:
        raise ValueError(f"fastunet: balance must be one of {', '.join(map(repr, BALANCES))}, got {balance!r}")
    costs = []
    for unit in range(len(UNITS)):
        cost = 0.0
        for conv in _unit_convs(model, unit):
            # an up block's conv runs at the resolution of the level it writes into
            per_pixel = conv.out_channels * (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                                             if balance == "flops" else 1)
            cost += per_pixel / 4 ** _depth(_level(unit))
        costs.append(cost)
    return costs


def _depth(level):
    """How many times level ``level``'s convolutions' resolution is halved from the image's (0 at full size)."""
    return level if level <= BOTTLENECK else len(LEVELS) - 1 - level


# Bytes training saves for backward per byte of a level's convolution outputs, as counted with
# torch.autograd.graph.saved_tensors_hooks (parameters left out) at 1 x 3 x 64^2 and 128^2 (the largest ratio of the
# two sizes, rounded up): fast mode saves the conv outputs BN needs and the fused BN + ReLU's outputs (encoder
# levels, 1.0-1.3), the decoders also their concatenations and up-convs (1.8-2.3); exact mode runs the seed's
# modules, which save the ReLUs' and BNs' inputs besides (2.3-2.6 and 3.3-3.4). tests/test_parallel.py holds the
# estimate to these counts.
_SAVED_PER_CONV_OUTPUT = {False: (1.3, 2.2), True: (2.5, 3.4)}  # exact: (encoder levels, decoder levels)


class MemoryModel(NamedTuple):
    """What balance="memory" counts a stage to hold in training, in bytes, per unit (UNITS): ``parameters`` (the
    parameters, their gradients and ``optimizer_states`` parameter-sized optimizer tensors each), ``activations``
    (saved for backward, one micro-batch), the tensors each unit hands on per micro-batch (``h`` and ``skips``, by
    the unit that makes them); ``layer_activations``: the bottleneck's two layers' activations where a stage holds
    one of them alone (run by its own modules, which save more); ``held``: the micro-batches each stage holds at
    once."""

    parameters: list
    activations: list
    h: list
    skips: list
    layer_activations: tuple
    held: list

    def stage(self, index, first, end):
        """Stage ``index`` of units ``first`` to ``end - 1``: its parameters' bytes, plus per micro-batch it holds
        its units' saved activations and its boundary tensors (what it receives and sends, the inputs kept for
        backward), plus one more micro-batch's boundary tensors (the gradients coming back and going out)."""
        boundary = (self.h[first - 1] if first else 0) + (self.h[end - 1] if end < len(UNITS) else 0)
        boundary += sum(self.skips[k] for cut in (first, end) for k in _skips_crossing(cut))
        activations = sum(self.activations[first:end])
        alone = [unit for unit in (BOTTLENECK, _SECOND_LAYER) if first <= unit < end]
        if len(alone) == 1:
            activations += self.layer_activations[alone[0] - BOTTLENECK] - self.activations[alone[0]]
        held = self.held[index]
        return sum(self.parameters[first:end]) + held * activations + (held + 1) * boundary


def memory_model(model, example_input=None, image_size=None, held=None, optimizer_states=2, num_stages=1):
    """The MemoryModel of training ``model`` on micro-batches like ``example_input`` (one micro-batch ``[n, C, H,
    W]``, a tensor or its shape, float32 unless a tensor says otherwise) or of one float32 image of ``image_size``
    (an int or (H, W)); ``held``: the micro-batches each of the ``num_stages`` stages holds at once (default 1)."""
    if example_input is None and image_size is None:
        raise ValueError("fastunet: balance='memory' counts the activations of the images trained: give "
                         "example_input= (a micro-batch) or image_size=, or balance='flops', or boundaries=")
    if example_input is not None:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else tuple(example_input)
        itemsize = example_input.element_size() if isinstance(example_input, torch.Tensor) else 4
        if len(shape) != 4:
            raise ValueError(f"fastunet: example_input is one micro-batch [N, C, H, W]; got shape {shape}")
        batch, height, width = shape[0], shape[2], shape[3]
    else:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        batch, itemsize = 1, 4
    if not optimizer_states >= 0:
        raise ValueError(f"fastunet: optimizer_states counts parameter-sized optimizer tensors; got {optimizer_states}")
    pixels = batch * height * width
    encoder, decoder = _SAVED_PER_CONV_OUTPUT[bool(model.exact)]
    per_pixel = level_costs(model, "memory")
    parameters, activations, h, skips = [], [], [], []
    for unit in range(len(UNITS)):
        level = _level(unit)
        held_params = [p for layer in _unit_layers(model, unit) for p in layer.parameters()]
        parameters.append((2 + optimizer_states) * sum(p.numel() * p.element_size() for p in held_params))
        factor = encoder if level <= BOTTLENECK else decoder
        activations.append(factor * per_pixel[unit] * pixels * itemsize)
        channels = _unit_convs(model, unit)[-1].out_channels
        out_depth = _depth(level) + 1 if level < BOTTLENECK else _depth(level)
        h.append(channels * pixels * itemsize / 4 ** out_depth)
        skips.append(channels * pixels * itemsize / 4 ** _depth(level) if level < BOTTLENECK else 0)
    seed_encoder = _SAVED_PER_CONV_OUTPUT[True][0]  # a layer alone runs the seed's modules, as exact mode does
    layer_activations = tuple(seed_encoder * per_pixel[u] * pixels * itemsize for u in (BOTTLENECK, _SECOND_LAYER))
    held = [1] * num_stages if held is None else list(held)
    return MemoryModel(parameters, activations, h, skips, layer_activations, held)


def balanced_boundaries(costs, num_stages, exclude=()):
    """The units (UNITS) where stages 1 to ``num_stages - 1`` start, so that the costliest stage costs the least
    (every contiguous cut tried but those starting a stage at a unit of ``exclude``; the first such cut wins a tie).
    ``costs``: each unit's (a stage costs the sum of its units'), or a MemoryModel (a stage costs
    MemoryModel.stage)."""
    if isinstance(costs, MemoryModel):
        units, stage_cost = len(costs.parameters), costs.stage
    else:
        units, stage_cost = len(costs), lambda _, a, b: sum(costs[a:b])
    best = None
    starts = [unit for unit in range(1, units) if unit not in exclude]
    if num_stages - 1 > len(starts):
        raise ValueError(f"fastunet: {num_stages} stages need {num_stages - 1} places to cut; {len(starts)} are "
                         "allowed here")
    for cut in itertools.combinations(starts, num_stages - 1):
        edges = (0, *cut, units)
        worst = max(stage_cost(i, a, b) for i, (a, b) in enumerate(zip(edges, edges[1:])))
        if best is None or worst < best[0]:
            best = (worst, cut)
    return best[1]


def pipeline_stages(model, num_stages, *, boundaries=None, balance="memory", example_input=None, image_size=None,
                    held_microbatches=None, optimizer_states=2):
    """``model`` (a fastunet.U_Net) cut into ``num_stages`` UNetStage modules sharing its parameters.

    ``boundaries``: the names of the units where stages 1 to ``num_stages - 1`` start, in order (UNITS: the levels
    Conv1 ... Conv4, the bottleneck's two layers Conv5 and Conv5.conv.3, then Up5 ... Up2, each decoder level with
    its double block, the last with the 1x1 conv); by default chosen by ``balance``, so that the costliest stage
    costs the least. A stage holding one of the bottleneck's layers runs it by its own modules (the block's fused
    path needs both); where they cannot stand for the block (bottleneck_split_refusal: hooks on it, a global
    module hook, a block not the seed's) the balance keeps it whole and a boundary inside it is an error:

    - ``"memory"``: what a stage holds in training (MemoryModel): its parameters, their gradients and the
      optimizer's state (``optimizer_states`` parameter-sized tensors per parameter: 2 for Adam or AdamW, the
      default; 1 for SGD with momentum; 0 for plain SGD), the activations its units save for backward for each
      micro-batch it holds at once (``held_microbatches``, one count per stage, default 1; build_pipeline passes
      its schedule's), and the tensors it receives and sends (kept per micro-batch held, plus one micro-batch's
      gradients). The activations need the micro-batch: ``example_input`` (one micro-batch ``[n, C, H, W]``, a
      tensor or its shape) or ``image_size`` (one float32 image, an int or (H, W)). Saved activations are
      estimated from the convolutions' output sizes (measured bytes saved per output element, per mode).
    - ``"flops"``: compute per stage (the convolutions' multiply-adds; level_costs).

    Chained, the stages compute what the model does (in exact mode, bit for bit); their ``state_dict`` keys
    together are the model's. Fast mode's CPU training runs in the layout the stages get (the whole model's
    channels_last inside is not taken across stages).
    """
    if not isinstance(model, U_Net):
        raise TypeError(f"fastunet.parallel cuts a fastunet.U_Net into stages, not a {type(model).__name__}")
    if not 1 <= num_stages <= len(UNITS):
        raise ValueError(f"fastunet: a U-Net has {len(UNITS)} units to cut into stages ({', '.join(UNITS)}); "
                         f"num_stages={num_stages}")
    refusal = bottleneck_split_refusal(model)
    if boundaries is None:
        if balance == "memory":
            costs = memory_model(model, example_input, image_size, held_microbatches, optimizer_states, num_stages)
            if len(costs.held) != num_stages:
                raise ValueError(f"fastunet: held_microbatches gives {len(costs.held)} counts for {num_stages} stages")
        else:
            costs = level_costs(model, balance)
        cut = balanced_boundaries(costs, num_stages, exclude=(_SECOND_LAYER,) * bool(refusal))
    else:
        names = tuple(boundaries)
        index = {name: unit for unit, name in enumerate(UNITS) if unit} | {"Conv5": BOTTLENECK}
        unknown = [n for n in names if n not in index]
        if unknown or len(names) != num_stages - 1:
            raise ValueError(f"fastunet: boundaries must name the {num_stages - 1} units where stages 1 to "
                             f"{num_stages - 1} start, among {', '.join(UNITS[1:])} (Conv5: Conv5.conv.0); got "
                             f"{list(names)}")
        cut = tuple(index[n] for n in names)
        if refusal and _SECOND_LAYER in cut:
            raise ValueError(f"fastunet: a stage cannot start at Conv5.conv.3 here: {refusal}; cut at Conv5 or Up5")
        if list(cut) != sorted(set(cut)):
            raise ValueError(f"fastunet: boundaries must be distinct units in forward order; got {list(names)}")
    edges = (0, *cut, len(UNITS))
    return [UNetStage(model, a, b) for a, b in zip(edges, edges[1:])]


class Schedule(NamedTuple):
    """A torch.distributed.pipelining schedule (its class's name there) and how a rank holds its stages:
    ``per_rank`` stages, placed ``"loop"`` (rank r holds stages r, r + R, ...) or ``"v"`` (rank r holds stages r
    and 2R - 1 - r)."""

    class_name: str
    per_rank: int
    style: str


SCHEDULES = {
    "gpipe": Schedule("ScheduleGPipe", 1, "loop"),
    "1f1b": Schedule("Schedule1F1B", 1, "loop"),
    "interleaved": Schedule("ScheduleInterleaved1F1B", 2, "loop"),
    "zbv": Schedule("ScheduleZBVZeroBubble", 2, "v"),
}


class LocalPipeline(NamedTuple):
    """This rank's part of a pipeline (build_pipeline): the schedule to ``step``, the UNetStage modules it holds,
    their stage indices, and whether it feeds the input (holds stage 0) and takes the target (holds the last)."""

    schedule: object
    modules: list
    indices: list
    first: bool
    last: bool


def materialize(model, modules):
    """Gives the parameters and buffers of ``modules`` (stages of ``model``, a U-Net built on the meta device) the
    values constructing the U-Net on the CPU would have given them from the global RNG state now, and draws the
    other layers' initial values only to discard them (one layer at a time, so that the RNG advances as the
    constructor advances it): a rank holds its own stages' parameters and never the whole model's."""
    local = {id(m) for stage in modules for m in stage.modules()}
    for layer in model.modules():
        if not (any(True for _ in layer.parameters(recurse=False)) or any(True for _ in layer.buffers(recurse=False))):
            continue
        if not callable(getattr(layer, "reset_parameters", None)):
            raise TypeError(f"fastunet: a {type(layer).__name__} on the meta device has no reset_parameters() to "
                            "initialise it; build the U-Net on the CPU, or give every rank its weights")
        layer.to_empty(device="cpu", recurse=False)
        layer.reset_parameters()
        if id(layer) not in local:
            layer.to_empty(device="meta", recurse=False)


def check_microbatches(microbatches, schedule, ranks):
    """A clear error, before any stage is built, where ``schedule`` cannot run ``microbatches`` micro-batches a step
    on ``ranks`` ranks: a count that is not a positive integer; 1F1B with fewer micro-batches than stages (its
    steady state runs one forward and one backward per stage); interleaved 1F1B where torch's
    ScheduleInterleaved1F1B cannot split them into its max(1, M // ranks) rounds of equal size."""
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"fastunet: microbatches is the number of micro-batches a step splits the batch into, a "
                         f"positive integer; got {microbatches!r}")
    stages = SCHEDULES[schedule].per_rank * ranks
    if schedule == "1f1b" and microbatches < stages:
        raise ValueError(f"fastunet: the 1f1b schedule needs at least as many micro-batches as stages ({stages} on "
                         f"{ranks} ranks); got {microbatches}. Use more micro-batches, or schedule='gpipe'")
    rounds = max(1, microbatches // ranks)
    if schedule == "interleaved" and microbatches % rounds:
        raise ValueError(f"fastunet: the interleaved schedule runs the micro-batches in max(1, M // ranks) rounds of "
                         f"equal size ({rounds} on {ranks} ranks), which {microbatches} micro-batches do not make; "
                         f"use a multiple of {ranks}, or fewer than {2 * ranks}")


def build_pipeline(model, microbatches, loss_fn, *, schedule="gpipe", group=None, device=None, boundaries=None,
                   balance="memory", example_input=None, image_size=None, optimizer_states=2, dp_group=None):
    """This rank's pipeline stages of ``model`` (a fastunet.U_Net) and the torch.distributed.pipelining schedule
    that runs them over the ranks of ``group``.

    ``model``: the same U-Net on every rank of ``group``, either with its weights (only this rank's stages are
    moved to ``device``) or built on the meta device (``with torch.device("meta"): U_Net(...)``, after seeding):
    then only this rank's stages get their parameters, the values the constructor would have drawn (see
    materialize), so no rank ever holds the whole model.
    ``schedule``: ``"gpipe"``, ``"1f1b"`` (one stage per rank; 1F1B needs at least as many micro-batches as
    stages), ``"interleaved"`` (interleaved 1F1B, two stages per rank in a loop; the micro-batches must split into
    max(1, M // ranks) equal rounds, as a multiple of the ranks or fewer than twice them do) or ``"zbv"`` (the
    zero-bubble V schedule, two stages per rank in a V: rank 0 holds the first and the last); a count the schedule
    cannot run is an error before any stage is built (check_microbatches). ``loss_fn(logits, target)`` is the loss
    of one micro-batch; the gradients are averaged over the ``microbatches`` (scale_grads), so a step equals
    gradient accumulation of the mean loss over the micro-batches. ``boundaries``, ``balance`` and
    ``optimizer_states``: as pipeline_stages; balance="memory" (the default) counts the activations of the
    micro-batches each stage holds at once under ``schedule`` (GPipe: all of them; 1F1B: stage s of P, min(M, P -
    s); the two-stages-per-rank schedules: counted as all of them), so it needs ``example_input`` (the batch
    ``step`` takes, a tensor or its shape ``[N, C, H, W]``, split into the micro-batches) or ``image_size``
    (micro-batches of one image). Each BatchNorm normalizes each micro-batch and
    moves its running stats once per micro-batch. ``dp_group``: the ranks holding the same stages in other
    data-parallel replicas; each stage is then wrapped in DistributedDataParallel over it, which averages the
    gradients once per step, after the last micro-batch (not with ``"zbv"``, whose split backward runs no DDP hook).
    Returns a LocalPipeline: ``schedule.step(x)`` on the rank that feeds the input, ``step(target=y,
    losses=[])`` on the one that takes the target (both on a rank that does both), ``step()`` elsewhere.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"fastunet: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if dp_group is not None and schedule == "zbv":
        raise ValueError("fastunet: the zbv schedule's split backward runs no DistributedDataParallel hook, so its "
                         "gradients would not be averaged over dp_group; use gpipe, 1f1b or interleaved with data "
                         "parallelism")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the stages' device current: where Triton launches, as PipelineStage expects
    spec = SCHEDULES[schedule]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    num_stages = spec.per_rank * world
    check_microbatches(microbatches, schedule, world)
    if example_input is not None:
        shape = list(example_input.shape if isinstance(example_input, torch.Tensor) else example_input)
        if len(shape) != 4 or shape[0] % microbatches:
            raise ValueError(f"fastunet: example_input is the batch [N, C, H, W] step takes, N a multiple of the "
                             f"{microbatches} micro-batches; got shape {tuple(shape)}")
        shape[0] //= microbatches
        example_input = example_input.new_empty(shape, device="meta") if isinstance(
            example_input, torch.Tensor) else shape
    held = [min(microbatches, num_stages - s) if schedule == "1f1b" else microbatches for s in range(num_stages)]
    modules = pipeline_stages(model, num_stages, boundaries=boundaries, balance=balance, example_input=example_input,
                              image_size=image_size, held_microbatches=held, optimizer_states=optimizer_states)
    if spec.style == "v":
        indices = [rank, num_stages - 1 - rank]
    else:
        indices = [rank + i * world for i in range(spec.per_rank)]
    local = [modules[i] for i in indices]
    if any(p.is_meta for p in model.parameters()):
        materialize(model, local)
    for module in local:
        module.to(device)
    if dp_group is not None:
        device_ids = [device] if device.type == "cuda" else None
        wrapped = [DistributedDataParallel(m, device_ids=device_ids, process_group=dp_group) for m in local]
    else:
        wrapped = local
    from torch.distributed import pipelining  # here, not at import: it loads torch._dynamo (about 2 s)

    stages = [pipelining.PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(wrapped, indices)]
    runner = getattr(pipelining, spec.class_name)(stages[0] if spec.per_rank == 1 else stages,
                                                  n_microbatches=microbatches, loss_fn=loss_fn)
    return LocalPipeline(runner, local, indices, 0 in indices, num_stages - 1 in indices)


def gather_state_dict(local, group=None):
    """The whole model's ``state_dict`` (CPU tensors) on the group's first rank, merged from every rank's stages
    (``local``: this rank's LocalPipeline); None on the other ranks. It loads strictly into the seed U-Net."""
    state = {key: value.detach().cpu() for module in local.modules for key, value in module.state_dict().items()}
    first = dist.get_rank(group) == 0
    parts = [None] * dist.get_world_size(group) if first else None
    dist.gather_object(state, parts, group=group, group_dst=0)
    return {key: value for part in parts for key, value in part.items()} if first else None


_M_MMAP_THRESHOLD = -3  # mallopt(3)'s parameter number
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)


def malloc_mmap_threshold(nbytes=4 << 20):
    """Sets this process's glibc malloc mmap threshold to ``nbytes`` (1 byte to 32 MiB; default 4 MiB): every block
    of that size or more is then mapped on its own and unmapped when freed, so freed activations go back to the
    system at once. glibc's own threshold rises to the largest block freed (up to 32 MiB); past it, the stripes of
    a split image (``spatial``, a quarter of an image's tensors on 4 ranks) are carved from the heap, which keeps
    them when freed: at 1 x 3 x 1024 x 256 on 4 ranks the largest rank's activation memory was 0.38-0.43x one
    process's as glibc comes, 0.30-0.31x with 4 MiB, for 11-23% more step time on 2 and 4 ranks (every mapped
    block is new pages, faulted in and zeroed at each step; one process's step the same; benchmarks/RESULTS.md).
    A process-wide setting, made only by this call (``fastunet.train --spatial`` makes it, ``--mmap-threshold``):
    call it in each process before training. Returns True where set; False where the C library is not glibc
    (nothing changed)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes <= _MMAP_THRESHOLD_MAX:
        raise ValueError(f"fastunet: nbytes is the block size from which malloc maps blocks apart, 1 byte to 32 MiB "
                         f"(glibc's largest); got {nbytes!r}")
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, nbytes))


from .spatial import SpatialUNet, gather_rows, spatial, split_rows  # noqa: E402, F401  (one namespace for users)
