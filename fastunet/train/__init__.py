"""Trains the reference U-Net or fastunet.U_Net on binary segmentation, and compares the two.

``python -m fastunet.train`` (``--help`` lists the options) trains on built-in synthetic shapes or on a folder of
``images/`` and ``masks/``, in one process or under ``torchrun`` (DDP, ``--pipeline N``, ``--spatial N``), and
writes to ``--out`` a checkpoint per model (it loads strictly into fastunet.reference.U_Net), ``history.json``
and ``loss.png``. ``--compare`` trains both models from the same initialisation on the same data.

Where what lives: ``cli`` (the options and their defaults, run(), main()), ``data`` (the datasets, image
reading, the loaders, DataError), ``loop`` (train(): steps, validation, checkpoints, progress), ``metrics``
(loss, Dice, IoU, the comparison of final losses), ``distributed`` (torchrun set-up, DDP, the pipeline and
row-split runners), ``batch`` (device and autocast of a batch), ``checkpoint``, ``report`` (table and plot).
"""

from .cli import main
from .data import DataError, ImageMaskFolder, SyntheticShapes
from .distributed import setup_distributed
from .loop import evaluate, train
from .metrics import compare_losses, dice_iou, dice_iou_per_sample, segmentation_loss

__all__ = [
    "DataError",
    "ImageMaskFolder",
    "SyntheticShapes",
    "compare_losses",
    "dice_iou",
    "dice_iou_per_sample",
    "evaluate",
    "main",
    "segmentation_loss",
    "setup_distributed",
    "train",
]
