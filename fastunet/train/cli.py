"""The command line of ``python -m fastunet.train``: its options and defaults, and run(), which trains the model(s)
they ask for and writes the results (see the package's docstring)."""

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

import fastunet

from .. import parallel, reference
from .data import DataError, build_datasets, build_loaders
from .distributed import prepare, prepare_pipelined, prepare_spatial, process_mesh, setup_distributed
from .loop import log, train
from .metrics import compare_losses, final_window
from .report import write_results

OUTPUT_CH = 1
PROG = "python -m fastunet.train"


def default_plan(device, data):
    """Defaults on ``device``: size, batch, epochs, steps per epoch (synthetic data), validation images, workers."""
    if device.type == "cuda":
        plan = {"size": 256, "batch": 16, "epochs": 5, "steps_per_epoch": 100, "val_samples": 64, "workers": 4}
    else:
        plan = {"size": 32, "batch": 4, "epochs": 2, "steps_per_epoch": 15, "val_samples": 16, "workers": 0}
    if data != "synthetic":
        plan.update(steps_per_epoch=None, val_samples=None)  # whole folder; 20% held out
    return plan


def parse_args(argv):
    """The options of ``argv`` (sys.argv's when None), checked (check_args); those left unset are filled in by
    fill_defaults once the device is known."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train the reference U-Net or fastunet.U_Net on binary segmentation; --compare trains both.",
    )
    parser.add_argument("--model", choices=("fastunet", "reference"), default="fastunet",
                        help="the model to train (default fastunet; --compare trains both)")
    parser.add_argument("--exact", action="store_true", help="fastunet in exact mode (bit for bit the reference)")
    parser.add_argument("--compare", action="store_true",
                        help="train the reference and fastunet from the same initialisation on the same data")
    add_data_options(parser)
    parser.add_argument("--loss", choices=("bce_dice", "bce"), default="bce_dice",
                        help="BCE-with-logits plus soft Dice (default), or BCE alone")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data and its order")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available, else cpu; under torchrun "
                                         "on CUDA, cuda:LOCAL_RANK)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="autocast to bfloat16, or float16 with a GradScaler (default none: float32)")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--tune", action="store_true",
                        help="before training, time each conv layer's algorithms on this machine for this batch "
                             "(fastunet.tune) and keep the fastest in this machine's plan (fastunet in fast mode, "
                             "one process per device; not with --pipeline or --spatial)")
    parser.add_argument("--img-ch", type=int, default=3, help="image channels (default 3)")
    parser.add_argument("--out", default="train_out", help="folder for checkpoints, history.json and loss.png")
    parser.add_argument("--sync-bn", action="store_true", help="synchronized BatchNorm across torchrun processes "
                                                               "(with --pipeline: across the replicas of each stage)")
    parser.add_argument("--pipeline", type=int,
                        help="under torchrun: cut the U-Net into pipeline stages over N processes "
                             "(fastunet.parallel; the processes form replicas of N, trained data-parallel)")
    parser.add_argument("--microbatches", type=int,
                        help="with --pipeline: micro-batches per batch (default: the number of stages); each "
                             "BatchNorm normalises each micro-batch")
    parser.add_argument("--pp-schedule", choices=("gpipe", "1f1b", "interleaved"), default="1f1b",
                        help="with --pipeline: the torch.distributed.pipelining schedule (default 1f1b; interleaved "
                             "holds two stages per process; zbv, in fastunet.parallel, trains but torch 2.14 cannot "
                             "run it forward-only for validation)")
    parser.add_argument("--spatial", type=int,
                        help="under torchrun: split each image by rows over N processes (fastunet.parallel.spatial; "
                             "the processes form replicas of N, trained data-parallel; --size a multiple of 16 N)")
    parser.add_argument("--mmap-threshold", type=int,
                        help="MiB: glibc malloc maps blocks of this size or more apart and gives them back when freed "
                             "(fastunet.parallel.malloc_mmap_threshold; default 4 with --spatial, whose stripes "
                             "glibc otherwise keeps in its heap; 0: malloc as it comes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none either off a terminal)")
    parser.add_argument("--log-every", type=int, default=10, help="without a progress bar, log every N steps")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default 0 on the CPU, 4 on CUDA)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def add_data_options(parser):
    """The options of the data and its amount: --data, --size, --batch, --epochs, --steps-per-epoch and the rest."""
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (shapes generated on the fly) or a folder with images/ and masks/")
    parser.add_argument("--size", type=int, help="image side, a multiple of 16 (default 32 on the CPU, 256 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size per process (default 4 on the CPU, 16 on CUDA)")
    parser.add_argument("--epochs", type=int, help="epochs (default 2 on the CPU, 5 on CUDA)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--steps-per-epoch", type=int,
                        help="synthetic: steps per epoch (default 15 on the CPU, 100 on CUDA), the training set "
                             "holds steps x batch x processes images; folder: at most this many steps per epoch")
    amount.add_argument("--train-samples", type=int, help="synthetic: training images (instead of --steps-per-epoch)")
    parser.add_argument("--val-samples", type=int,
                        help="held-out validation images (default synthetic: 16 on the CPU, 64 on CUDA; "
                             "folder: 20%%, at least 1)")


def check_args(parser, args):
    """Exits through ``parser.error`` on a size that is not a multiple of 16, a misplaced or out-of-range count."""
    if args.size is not None and (args.size <= 0 or args.size % 16):
        parser.error("--size must be a positive multiple of 16 (four 2x2 max-pools)")
    if args.data != "synthetic" and args.train_samples is not None:
        parser.error("--train-samples applies to --data synthetic only (a folder is used whole)")
    if args.pipeline is None and args.microbatches is not None:
        parser.error("--microbatches applies to --pipeline only")
    if args.tune and (args.pipeline or args.spatial):
        parser.error("--tune times whole layers on one device: run it without --pipeline or --spatial first (later "
                     "runs use the plan it stores)")
    if args.pipeline is not None and (args.compare or args.model != "fastunet" or args.amp == "fp16"):
        parser.error("--pipeline trains fastunet.U_Net alone (not --compare or --model reference), in float32 or "
                     "--amp bf16 (fp16's GradScaler would skip steps on some stages and not others)")
    if args.spatial is not None and (args.compare or args.model != "fastunet" or args.pipeline is not None):
        parser.error("--spatial trains fastunet.U_Net alone (not --compare, --model reference or --pipeline)")
    if args.spatial and args.size is not None and args.size % (16 * args.spatial):
        parser.error(f"--spatial {args.spatial} splits each image into {args.spatial} stripes of a multiple of 16 "
                     f"rows: --size must be a multiple of {16 * args.spatial}")
    for name in ("batch", "epochs", "steps_per_epoch", "train_samples", "img_ch", "pipeline", "microbatches",
                 "spatial"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("val_samples", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    if args.mmap_threshold is not None and not 0 <= args.mmap_threshold <= 32:
        parser.error("--mmap-threshold must be 0 (malloc as it comes) to 32 MiB (glibc's largest)")


def fill_defaults(args, device):
    """Sets the options left unset to default_plan's values for ``device`` and the data, in place."""
    plan = default_plan(device, args.data)
    for key, value in plan.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_samples:
        args.steps_per_epoch = None


def load_data(args, rank, world):
    """(training set, validation set) of build_datasets, checked to hold a batch per process, and logged."""
    train_set, val_set = build_datasets(args, world)
    if len(train_set) < args.batch * world:
        raise DataError(f"the training split of {args.data} has {len(train_set)} images, fewer than one batch of "
                        f"{args.batch} per data-parallel process ({world}): lower --batch or --val-samples, or add "
                        f"images")
    log(f"data: {args.data}, {len(train_set)} training and {len(val_set)} validation images of "
        f"{args.img_ch} x {args.size} x {args.size}", rank)
    return train_set, val_set


def build_model(name, args, state=None):
    """fastunet.U_Net (``args.exact``) or the reference U-Net, ``img_ch`` -> 1 channel, loaded with ``state``."""
    if name == "reference":
        model = reference.U_Net(args.img_ch, OUTPUT_CH)
    else:
        model = fastunet.U_Net(args.img_ch, OUTPUT_CH, exact=args.exact)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def tune_model(model, args, device, rank):
    """fastunet.tune of ``model`` (already on ``device`` in the run's layout) for a training step on a batch of
    ``args``, under the run's autocast (the model itself is not run or changed)."""
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    example = torch.empty(args.batch, args.img_ch, args.size, args.size, device=device, memory_format=layout)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        tuning = fastunet.tune(model, example, train=True)
    log(f"tuned {len(tuning)} conv choices on this machine: {tuning.file}", rank)


def train_model(name, model, train_set, val_set, args, config, device, rank, world, mesh=None):
    """Trains one model of ``run`` from the seeded RNG state; its history with the final loss and checkpoint path.
    With a ProcessMesh ``mesh``, ``model`` trains as pipeline stages (``--pipeline``; built on the meta device) or
    split by rows (``--spatial``)."""
    torch.manual_seed(args.seed)  # the same global RNG state for each model (DataLoader base seeds)
    replica, replicas = (mesh.replica, mesh.replicas) if mesh else (rank, world)
    train_loader, val_loader = build_loaders(train_set, val_set, args, device, replica, replicas)
    checkpoint = os.path.join(args.out, f"checkpoint_{name}.pt" if args.compare else "checkpoint.pt")
    if mesh:
        prepared = (prepare_pipelined if args.pipeline else prepare_spatial)(model, args, device, mesh)
    else:
        prepared = prepare(model, args, device, world)
        if args.tune and name == "fastunet" and not args.exact:  # check_args refuses --tune with a mesh
            tune_model(getattr(prepared, "module", prepared), args, device, rank)
    history = train(
        prepared, train_loader, epochs=args.epochs, lr=args.lr, device=device,
        val_loader=val_loader, loss=args.loss, amp=args.amp, channels_last=args.channels_last,
        steps_per_epoch=args.steps_per_epoch, log_every=args.log_every,
        progress=not args.no_progress and sys.stderr.isatty(), name=name, checkpoint=checkpoint,
        args=config,
    )
    history["final_loss"] = statistics.fmean(history["losses"][-final_window(len(history["losses"])):])
    history["checkpoint"] = checkpoint
    return history


def run(args, device, rank, world):
    """Trains the model(s) of ``args``; returns the history dict that history.json holds."""
    fill_defaults(args, device)
    names = ["reference", "fastunet"] if args.compare else [args.model]
    mesh = None
    if args.pipeline:
        args.microbatches = args.microbatches or args.pipeline * parallel.SCHEDULES[args.pp_schedule].per_rank
        if args.batch % args.microbatches:
            raise ValueError(f"--batch {args.batch} does not split into {args.microbatches} equal micro-batches")
        mesh = process_mesh("pp", args.pipeline, device, world)
    elif args.spatial:
        if args.size % (16 * args.spatial):
            raise ValueError(f"--spatial {args.spatial} needs --size a multiple of {16 * args.spatial} (stripes of a "
                             f"multiple of 16 rows); it is {args.size}")
        mesh = process_mesh("sp", args.spatial, device, world)
    if args.mmap_threshold is None:
        args.mmap_threshold = 4 if args.spatial else 0
    config = {**vars(args), "device": str(device), "world_size": world, "models": names}
    log(f"config: {json.dumps(config)}", rank)
    if args.pipeline:
        log(f"pipeline: {args.pipeline} processes x {mesh.replicas} replicas, {args.pp_schedule} schedule, "
            f"{args.microbatches} micro-batches of {args.batch // args.microbatches}", rank)
    elif args.spatial:
        log(f"spatial: each image in {args.spatial} stripes of {args.size // args.spatial} rows x {mesh.replicas} "
            f"replicas", rank)
    if args.mmap_threshold:
        mapped = parallel.malloc_mmap_threshold(args.mmap_threshold << 20)
        log(f"malloc: blocks of {args.mmap_threshold} MiB or more mapped apart, given back when freed" if mapped
            else "malloc: not glibc's, --mmap-threshold left it as it is", rank)
    if args.sync_bn and (mesh.replicas if mesh else world) == 1:
        log("--sync-bn with one replica: synchronized BN computes plain BatchNorm", rank)

    train_set, val_set = load_data(args, rank, mesh.replicas if mesh else world)
    torch.manual_seed(args.seed)
    with torch.device("meta") if args.pipeline else contextlib.nullcontext():  # a stage builds its own part
        models = {names[0]: build_model(names[0], args)}
    if args.compare:
        models["fastunet"] = build_model("fastunet", args, state=copy.deepcopy(models["reference"].state_dict()))

    os.makedirs(args.out, exist_ok=True)
    histories = {}
    for name, model in models.items():
        histories[name] = train_model(name, model, train_set, val_set, args, config, device, rank, world, mesh)

    result = {"config": config, "models": histories}
    if args.compare:
        result["comparison"] = compare_losses(histories["reference"]["losses"], histories["fastunet"]["losses"])
    result["history"], result["plot"] = os.path.join(args.out, "history.json"), os.path.join(args.out, "loss.png")
    if rank == 0:
        write_results(result, names, args, device, world)
    return result


def data_error_message(error):
    """The one-line message of a DataError. One raised in a DataLoader worker comes back re-made around the
    worker's traceback text (torch.utils.data's ExceptionWrapper), whose last line is ``<class>: <message>``."""
    lines = str(error).strip().splitlines()
    if len(lines) <= 1:
        return str(error)
    _, colon, message = lines[-1].partition(": ")
    return message if colon else lines[-1]


def main(argv=None):
    """Parses ``argv``, trains (under torchrun: in every process), returns the history dict of run(). A DataError
    ends it as a bad option does: one ``error:`` line on stderr, exit status 2."""
    args = parse_args(argv)
    device, rank, world = setup_distributed(args.device)
    try:
        return run(args, device, rank, world)
    except DataError as error:
        print(f"{PROG}: error: {data_error_message(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
