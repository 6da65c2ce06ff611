"""Training over several processes: the torchrun set-up, DDP, the pipeline runner (``--pipeline``) and the
row-split runner (``--spatial``), each process building only its own part."""

import functools
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fastunet

from .. import parallel, spatial
from .batch import autocast, to_device
from .checkpoint import write_checkpoint
from .metrics import dice_iou_per_sample, segmentation_loss


def setup_distributed(device_arg):
    """(device, rank, world size). Under torchrun (LOCAL_RANK set, or WORLD_SIZE > 1) it initialises the default
    process group: nccl on CUDA (device cuda:LOCAL_RANK), gloo on the CPU. A CUDA device named by its index becomes
    the current one (as under torchrun), so that work launched on the current device (Triton's) runs there."""
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "LOCAL_RANK" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def prepare(model, args, device, world):
    """The model on ``device`` (channels_last if asked), with synchronized BN if asked, DDP-wrapped under torchrun."""
    if args.sync_bn:  # on CUDA nn.SyncBatchNorm's own function; on the CPU (where it cannot run) its twin
        model = fastunet.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


class ProcessMesh(NamedTuple):
    """The torchrun processes as replicas of one model split over several processes (``--pipeline``: a (pp x dp)
    mesh; ``--spatial``: (dp x sp)): this process's split group (its pipeline, or the ranks sharing its images'
    rows), data-parallel group (None with one replica), its replica's index and the number of replicas."""

    split_group: object
    dp_group: object
    replica: int
    replicas: int


def process_mesh(split, ranks, device, world):
    """The ProcessMesh of ``world`` processes in replicas of ``ranks``. ``split`` "pp": a DeviceMesh ("pp", "dp"),
    the ranks of one pipeline ``replica, replica + replicas, ...``; "sp": ("dp", "sp"), the ranks of one image
    consecutive (neighbouring stripes exchange halos at every conv: on one node where there are several)."""
    option = {"pp": "--pipeline", "sp": "--spatial"}[split]
    if not dist.is_initialized() or world % ranks:
        raise ValueError(f"{option} {ranks} runs under torchrun on a multiple of {ranks} processes; this run has "
                         f"{world}")
    replicas = world // ranks
    shape, names = ((ranks, replicas), ("pp", "dp")) if split == "pp" else ((replicas, ranks), ("dp", "sp"))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    dp_group = mesh.get_group("dp") if replicas > 1 else None
    return ProcessMesh(mesh.get_group(split), dp_group, mesh.get_local_rank("dp"), replicas)


def _micro_batch_loss(logits, target, *, kind, device_type):
    """segmentation_loss of one micro-batch, outside autocast as train_step computes it."""
    with torch.autocast(device_type, enabled=False):
        return segmentation_loss(logits, target, kind)


def prepare_pipelined(model, args, device, mesh):
    """A PipelinedUNet of ``model`` (a fastunet.U_Net built on the meta device under the seed): synchronized BN
    over the replicas of each stage if asked, channels_last if asked, this process's stages built and
    initialised (fastunet.parallel.build_pipeline)."""
    if args.sync_bn and mesh.dp_group is not None:
        model = fastunet.convert_sync_batchnorm(model, mesh.dp_group)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = functools.partial(_micro_batch_loss, kind=args.loss, device_type=device.type)
    batch = (args.batch, args.img_ch, args.size, args.size)  # the stages balanced for its memory (with Adam's state)
    local = parallel.build_pipeline(model, args.microbatches, loss_fn, schedule=args.pp_schedule,
                                    group=mesh.split_group, device=device, example_input=batch,
                                    dp_group=mesh.dp_group)
    return PipelinedUNet(local, mesh.split_group, mesh.dp_group)


def prepare_spatial(model, args, device, mesh):
    """``model`` on ``device`` split by rows over ``mesh.split_group`` (fastunet.parallel.spatial, taking and
    returning whole images), DDP-wrapped over the replicas (its buckets summed over the stripes and averaged over
    the replicas in one all-reduce); ``--sync-bn``: BatchNorm over every process."""
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    net = parallel.spatial(model, mesh.split_group, whole_images=True,
                           bn_group=dist.group.WORLD if args.sync_bn else None, sum_grads=mesh.dp_group is None)
    if mesh.dp_group is None:
        return net
    device_ids = [device] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, process_group=mesh.dp_group)
    # one all-reduce per bucket over every process: summed over the stripes, averaged over the replicas
    ddp.register_comm_hook(spatial.StripesAndReplicas(dist.group.WORLD, dist.get_world_size(mesh.dp_group)),
                           spatial.sum_over_stripes_hook)
    return ddp


class PipelinedUNet:
    """A fastunet.U_Net trained as pipeline stages over a (pp x dp) mesh of torchrun processes (``--pipeline``).

    ``local``: this rank's LocalPipeline (fastunet.parallel.build_pipeline); ``pp_group``: the ranks of its
    pipeline, ``dp_group``: the ranks holding its stages in the other replicas (None without data parallelism).
    train() drives it as it drives a module: ``parameters()`` are this rank's stages' only; ``step`` runs one
    pipeline step over the schedule's micro-batches; evaluate and the checkpoint go through the pipeline too.
    """

    def __init__(self, local, pp_group, dp_group):
        self.local, self.pp_group, self.dp_group = local, pp_group, dp_group
        self.replicas = 1 if dp_group is None else dist.get_world_size(dp_group)

    def parameters(self):
        return [p for module in self.local.modules for p in module.parameters()]

    def train(self, mode=True):
        for module in self.local.modules:
            module.train(mode)

    def eval(self):
        self.train(False)

    def run(self, x, target, device, *, amp, channels_last, training):
        """One step of the schedule (``training``) or a forward-only pass on a batch; returns (the logits on the
        rank holding the last stage, else None; the micro-batches' losses there, else [])."""
        losses = []
        args = (to_device(x, device, channels_last),) if self.local.first else ()
        kwargs = {"target": target.to(device), "losses": losses} if self.local.last else {}
        with autocast(device, amp):
            out = (self.local.schedule.step if training else self.local.schedule.eval)(*args, **kwargs)
        return out, losses

    def step(self, optimizer, x, target, device, *, amp, channels_last):
        """One optimizer step on a batch (the schedule averages the gradients over the micro-batches, DDP over
        the replicas); returns the mean of the micro-batches' losses, averaged over the replicas (a float)."""
        optimizer.zero_grad(set_to_none=True)
        _, losses = self.run(x, target, device, amp=amp, channels_last=channels_last, training=True)
        optimizer.step()
        value = torch.stack(losses).float().mean() if losses else torch.zeros((), device=device)
        dist.all_reduce(value)  # one rank per replica holds the last stage
        return (value / self.replicas).item()

    def evaluate(self, loader, device, *, amp, channels_last, batch):
        """(Dice, IoU) as evaluate() computes them, through the pipeline in eval mode. Each batch is padded to
        ``batch`` images (the training batch: the stages' message shapes are fixed by it) with copies of its last
        image, whose logits are dropped (BatchNorm in eval mode treats the images independently)."""
        if self.dp_group is not None:
            for module in self.local.modules:
                for buffer in module.buffers():
                    dist.broadcast(buffer, group=self.dp_group, group_src=0)
        self.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for x, target in loader:
                n = len(x)
                pad = batch - n
                x, padded_target = (torch.cat((t, t[-1:].expand(pad, *t.shape[1:]))) for t in (x, target))
                logits, _ = self.run(x, padded_target, device, amp=amp, channels_last=channels_last, training=False)
                if logits is not None:
                    dice, iou = dice_iou_per_sample(logits[:n], target.to(device))
                    sums += torch.stack([dice.sum().double(), iou.sum().double(),
                                         torch.tensor(n, dtype=torch.float64, device=device)])
        dist.all_reduce(sums)
        self.train()
        dice, iou, count = sums.tolist()
        return dice / max(count, 1), iou / max(count, 1)

    def save_checkpoint(self, path, optimizer, epoch, history, args):
        """save_checkpoint's file, written by rank 0 from the stages of its replica: the whole model's state_dict
        (it loads strictly into the seed U-Net) and the optimizer's state keyed by parameter name."""
        if self.dp_group is not None and dist.get_rank(self.dp_group) != 0:
            return
        model = parallel.gather_state_dict(self.local, self.pp_group)
        names = {p: name for module in self.local.modules for name, p in module.named_parameters()}
        state = {names[p]: {key: value.detach().cpu() if torch.is_tensor(value) else value
                            for key, value in optimizer.state[p].items()} for p in names if p in optimizer.state}
        parts = [None] * dist.get_world_size(self.pp_group) if model is not None else None
        dist.gather_object(state, parts, group=self.pp_group, group_dst=0)
        if model is None:
            return
        groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        optimizer_state = {"state": {k: v for part in parts for k, v in part.items()}, "param_groups": groups}
        write_checkpoint(path, model, optimizer_state, epoch, history, args)
