"""``python -m fastunet.train``: trains the reference U-Net or fastunet.U_Net on binary segmentation (see cli)."""

from .cli import (
    ImageMaskFolder,
    SyntheticShapes,
    compare_losses,
    dice_iou,
    dice_iou_per_sample,
    main,
    segmentation_loss,
    setup_distributed,
    train,
)

__all__ = [
    "ImageMaskFolder",
    "SyntheticShapes",
    "compare_losses",
    "dice_iou",
    "dice_iou_per_sample",
    "main",
    "segmentation_loss",
    "setup_distributed",
    "train",
]
