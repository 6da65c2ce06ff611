"""The configs the bench measures: the models (reference eager and compiled, fastunet exact, fast, checkpointed,
compiled) on the same weights and random batches, their training and inference steps, the float64 reference run the
errors are measured against, one config's errors, times and peak memory, and the reference's model FLOPs."""

import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import U_Net, reference
from ..testing import bn_cancelled_biases, parameter_grads, relative_error
from .timing import first_call_s, median_ms, peak_growth_mib, progress

CONFIGS = {
    "reference_eager": "reference eager",
    "reference_compile": "reference compile",
    "fastunet_exact": "fastunet exact",
    "fastunet_fast": "fastunet fast",
    "fastunet_fast_checkpointing": "fastunet fast ckpt",
    "fastunet_fast_compile": "fastunet fast compile",
}
COMPILED = ("reference_compile", "fastunet_fast_compile")
IMG_CH, OUTPUT_CH = 3, 1
N_BATCHES = 3
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated over one step, minus memory_allocated before it"
CPU_MEMORY_METHOD = "peak RSS over one step minus RSS before it, in a fresh subprocess where RSS follows live memory"
# With a fixed mmap threshold from the start, glibc maps every block of 64 KiB or more on its own and
# unmaps it when freed, so RSS tracks the tensors alive (too slow an allocator for the timings).
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def build_model(config, device, channels_last, state):
    """The model of ``config`` on ``device``, loaded with ``state``."""
    if config.startswith("reference"):
        model = reference.U_Net(IMG_CH, OUTPUT_CH)
    else:
        model = U_Net(IMG_CH, OUTPUT_CH, exact=config == "fastunet_exact",
                      checkpointing=config == "fastunet_fast_checkpointing")
    model.load_state_dict(state)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.compile(model) if config in COMPILED else model


def random_batches(count, batch, size, device, channels_last):
    """``count`` pre-drawn (random input, random binary mask) pairs."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [
        (
            torch.randn(batch, IMG_CH, size, size, device=device).contiguous(memory_format=memory_format),
            (torch.rand(batch, OUTPUT_CH, size, size, device=device) < 0.5).float(),
        )
        for _ in range(count)
    ]


def initial_state(batches, device):
    """state_dict of a fresh reference U-Net whose BatchNorm running statistics average ``batches``.

    With the initial statistics (0, 1), eval-mode activations shrink layer after layer into denormal
    floats, which run about 10x slower on a CPU; measured statistics keep them at a normal scale.
    """
    model = reference.U_Net(IMG_CH, OUTPUT_CH).to(device)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model.state_dict()


def make_steps(model, autocast):
    """The training step (forward, BCE loss, backward; returns the output) and the inference step."""

    def train(x, target):
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
        F.binary_cross_entropy_with_logits(out.to(target.dtype), target).backward()
        return out

    def infer(x, target):
        with torch.no_grad(), autocast():
            return model(x)

    return train, infer


def autocast_for(device, dtype):
    """A context-manager factory: bfloat16 autocast on ``device``, or nothing for float32."""
    if dtype == "bfloat16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Float64Run(NamedTuple):
    """The float64 reference run the errors are measured against."""

    out: torch.Tensor  # training-step output
    grads: dict  # parameter name -> gradient
    excluded: set  # the conv biases BN cancels (bn_cancelled_biases)
    infer_out: torch.Tensor  # eval-mode output


def float64_reference(state, batch, device):
    """Float64Run of the reference on ``batch``: a training step from ``state``, then inference in eval mode."""
    model = reference.U_Net(IMG_CH, OUTPUT_CH).to(device, torch.float64)
    model.load_state_dict(state)
    train, infer = make_steps(model, contextlib.nullcontext)
    x, target = batch
    out = train(x.double(), target.double()).detach()
    grads = parameter_grads(model)
    model.load_state_dict(state)  # the step moved the running stats
    model.eval()
    return Float64Run(out, grads, bn_cancelled_biases(model), infer(x.double(), target))


def measure(config, state, batches, exact_step, device, autocast, warmup, reps, channels_last, memory=True):
    """Errors, times and (CUDA, unless not ``memory``) peak memory of one config."""
    label = CONFIGS[config]
    compiling = " (torch.compile compiles on the first calls)" if config in COMPILED else ""
    progress(f"{label}: first training step{compiling}, errors vs float64")
    model = build_model(config, device, channels_last, state)
    train, infer = make_steps(model, autocast)
    first_train, out = first_call_s(train, batches[0], device)
    grad_errors = {
        name: relative_error(grad, exact_step.grads[name])
        for name, grad in parameter_grads(model).items()
        if name not in exact_step.excluded
    }
    worst_param = max(grad_errors, key=grad_errors.get)
    result = {
        "config": config,
        "label": label,
        "out_rel_err": relative_error(out.detach(), exact_step.out),
        "grad_rel_err": grad_errors[worst_param],
        "worst_grad_param": worst_param,
        "first_train_s": first_train,
    }
    del out
    progress(f"{label}: training step, {warmup} warm-up + {reps} timed")
    result["train_ms"] = median_ms(train, batches, warmup, reps, device)
    getattr(model, "_orig_mod", model).load_state_dict(state)  # the steps moved the running stats
    model.eval()
    result["first_infer_s"], infer_out = first_call_s(infer, batches[0], device)
    result["infer_rel_err"] = relative_error(infer_out, exact_step.infer_out)
    progress(f"{label}: inference, {warmup} warm-up + {reps} timed")
    result["infer_ms"] = median_ms(infer, batches, warmup, reps, device)
    if device.type == "cuda" and memory:
        progress(f"{label}: peak memory")
        result.update(measure_peak_memory(model, batches[0], device, autocast))
    return result


def failure(error):
    """A row's "skipped" reason for ``error``: its type and the first line of its message."""
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"failed: {type(error).__name__}: {first_line}"


def measure_peak_memory(model, batch, device, autocast):
    """Peak memory (MiB) of a training step and of an inference call, each after one unmeasured call."""
    train, infer = make_steps(model, autocast)
    model.train()
    train(*batch)
    peaks = {"train_peak_mib": peak_growth_mib(model, train, batch, device)}
    model.eval()
    infer(*batch)
    peaks["infer_peak_mib"] = peak_growth_mib(model, infer, batch, device)
    return peaks


def cpu_memory_worker(spec):
    """The subprocess side of cpu_peak_memory: prints {config: peaks} as JSON."""
    spec = json.loads(spec)
    device = torch.device("cpu")
    torch.manual_seed(0)
    batches = random_batches(1, spec["batch"], spec["size"], device, spec["channels_last"])
    state = initial_state(batches, device)
    peaks = {}
    for config in spec["configs"]:
        model = build_model(config, device, spec["channels_last"], state)
        peaks[config] = measure_peak_memory(model, batches[0], device, autocast_for(device, spec["dtype"]))
        del model
    print(json.dumps(peaks))


def memory_method(device):
    """How peak memory is measured on ``device``, or why it is not."""
    if device.type == "cuda":
        return CUDA_MEMORY_METHOD
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        return CPU_MEMORY_METHOD
    return "n/a: on the CPU it is measured on Linux with glibc only"


def cpu_peak_memory(configs, args):
    """config -> CPU peaks, from one fresh subprocess started with CPU_MEMORY_ENV (or an error line)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    spec = {"configs": configs, "batch": args.batch, "size": args.size, "dtype": args.dtype,
            "channels_last": args.channels_last}
    worker = "import sys; from fastunet.bench.configs import cpu_memory_worker; cpu_memory_worker(sys.argv[1])"
    run = subprocess.run(
        [sys.executable, "-c", worker, json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, **CPU_MEMORY_ENV, "PYTHONPATH": python_path},
    )
    if run.returncode:
        return None, (run.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(run.stdout.splitlines()[-1]), None


def reference_flops(batch, size):
    """FLOPs of the reference U-Net's training step (forward + backward) and inference on ``[batch, 3, size,
    size]``: the model FLOPs every config is credited with (counted on the meta device; 392 GFLOP per
    3 x 256 x 256 image in training)."""
    with torch.device("meta"):
        model = reference.U_Net(IMG_CH, OUTPUT_CH)
        x = torch.randn(batch, IMG_CH, size, size)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    infer = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        F.binary_cross_entropy_with_logits(out, torch.zeros_like(out)).backward()
    return counter.get_total_flops(), infer
