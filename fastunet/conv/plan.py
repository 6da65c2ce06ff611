"""Tuned plans on disk: the algorithm ``fastunet.tune`` measured fastest for each layer, kept per machine.

A plan maps ``(decision, Layer.key())`` (fastunet.conv.policy) to an algorithm of that decision. It is stored as
JSON in ``FASTUNET_PLAN_DIR`` (default ``~/.cache/fastunet``), one file per machine: the file's name is a hash of
``machine()`` (CPU model and instruction sets, threads, oneDNN's ISA cap, GPUs, torch and fastunet versions), so a
plan measured on one machine, thread count or torch is never read on another. The policy reads this machine's file
at its first choice in a process (``current``); ``FASTUNET_PLAN=off`` ignores it.
"""

import functools
import hashlib
import json
import os
import threading

import torch

_ISA_FLAGS = ("avx2", "f16c", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
_FORMATS = {"channels_last": torch.channels_last, "contiguous_format": torch.contiguous_format}

_lock = threading.Lock()
_loaded = {}  # path -> {(decision, key): algorithm}


def _cpu():
    """(model name, the instruction sets of _ISA_FLAGS it has) from /proc/cpuinfo (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return "", []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = next((v.strip() for k, v in fields.items() if k.strip() == "model name"), "")
    flags = next((v.split() for k, v in fields.items() if k.strip() == "flags"), [])
    return model, [flag for flag in _ISA_FLAGS if flag in flags]


@functools.cache
def _hardware():
    """The CPU model, its instruction sets and the GPUs (read once)."""
    from .. import __version__

    model, isa = _cpu()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": model, "isa": isa, "gpus": gpus, "torch": torch.__version__, "fastunet": __version__}


def machine():
    """What a plan's timings depend on besides the layers: the CPU, its threads, the GPUs, the software."""
    return {**_hardware(), "threads": torch.get_num_threads(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


@functools.lru_cache(maxsize=16)
def _path(plan_dir, home, threads, isa_cap):
    """The plan file for these settings (every conv's choice asks: kept per settings, not made anew)."""
    folder = plan_dir or os.path.join(os.path.expanduser("~"), ".cache", "fastunet")
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(folder, f"plan-{digest}.json")


def path():
    """This machine's plan file."""
    environ = os.environ
    return _path(environ.get("FASTUNET_PLAN_DIR"), environ.get("HOME"), torch.get_num_threads(),
                 environ.get("ONEDNN_MAX_CPU_ISA", ""))


def _encode_key(key):
    return {field: (str(value).removeprefix("torch.") if isinstance(value, (torch.dtype, torch.memory_format))
                    else value) for field, value in key._asdict().items()}


def _decode_key(fields):
    from .policy import Layer

    decoded = dict(fields)
    for name in ("dtype", "weight_dtype"):
        decoded[name] = getattr(torch, fields[name])
    for name in ("layout", "weight_layout"):
        decoded[name] = _FORMATS[fields[name]]
    return Layer(**decoded)


def load(file):
    """The plan stored in ``file`` (empty where there is none)."""
    try:
        with open(file) as f:
            stored = json.load(f)
    except FileNotFoundError:
        return {}
    return {(entry["decision"], _decode_key(entry["layer"])): entry["algorithm"] for entry in stored["entries"]}


def save(entries, timings):
    """Adds ``entries`` (``{(decision, key): algorithm}``) to this machine's plan file, with their ``timings``
    (``{(decision, key): {algorithm: ms}}``), and makes them current; returns the file."""
    file = path()
    with _lock:
        plan = {**load(file), **entries}
        os.makedirs(os.path.dirname(file), exist_ok=True)
        records = [{"decision": decision, "layer": _encode_key(key), "algorithm": algorithm,
                    "ms": timings.get((decision, key), {})} for (decision, key), algorithm in plan.items()]
        temporary = f"{file}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump({"machine": machine(), "entries": records}, f, indent=1)
        os.replace(temporary, file)
        _loaded[file] = plan
    return file


def current():
    """This machine's plan, read once per process and file (``FASTUNET_PLAN=off``: an empty plan)."""
    if os.environ.get("FASTUNET_PLAN", "").lower() in ("off", "0", "false", "no"):
        return {}
    file = path()
    plan = _loaded.get(file)
    if plan is None:  # read once; later calls (every conv's choice) take no lock
        with _lock:
            plan = _loaded.setdefault(file, load(file))
    return plan
