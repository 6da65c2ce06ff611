"""fastunet.train on the CPU: the synthetic and folder datasets, Dice/IoU, and ``--compare`` end to end: the
reference and fastunet, trained from the same initialisation on the same data, both learn and end within noise
of each other; checkpoints load strictly into the reference U-Net."""

import json
import os

import matplotlib.image
import numpy as np
import pytest
import torch
from helpers import PNG_SIGNATURE
from torch.utils.data import DataLoader, Subset

import fastunet
from fastunet.reference import U_Net as Reference
from fastunet.train import (
    DataError,
    ImageMaskFolder,
    SyntheticShapes,
    compare_losses,
    dice_iou,
    dice_iou_per_sample,
    main,
)

# 2 epochs x 10 steps of batch 4 at 32 x 32: about 20 s for both models on 2 cores.
TINY = ["--device", "cpu", "--size", "32", "--batch", "4", "--epochs", "2", "--steps-per-epoch", "10",
        "--val-samples", "8", "--no-progress", "--log-every", "0"]


def load_checkpoint_into_reference(path):
    checkpoint = torch.load(path)
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    model = Reference(3, 1)
    model.load_state_dict(checkpoint["model"], strict=True)
    return checkpoint, model


def dice_iou_of(model, dataset, batch):
    """[Dice, IoU] of ``model`` in eval mode, the means over ``dataset``'s samples taken in batches of ``batch``."""
    model.eval()
    per_sample = []
    with torch.no_grad():
        for images, masks in DataLoader(dataset, batch_size=batch):
            per_sample.append(torch.stack(dice_iou_per_sample(model(images), masks), 1))
    return torch.cat(per_sample).double().mean(0).tolist()


def test_synthetic_shapes_are_deterministic_binary_and_never_empty():
    data = SyntheticShapes(8, size=32, img_ch=3, seed=0)
    again = SyntheticShapes(8, size=32, img_ch=3, seed=0)
    other_seed = SyntheticShapes(8, size=32, img_ch=3, seed=1)
    for i in range(len(data)):
        image, mask = data[i]
        assert image.dtype == mask.dtype == torch.float32
        assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
        assert torch.equal(image, again[i][0]) and torch.equal(mask, again[i][1])
        assert not torch.equal(mask, other_seed[i][1])
        assert ((mask == 0) | (mask == 1)).all()
        assert 0 < mask.sum() < mask.numel()
        assert torch.isfinite(image).all() and image.std() > 0.5 and image.mean().abs() < 1e-3
        # the shapes stand out: the mean image inside the mask differs from the mean outside it
        inside, outside = image[:, mask[0] > 0].mean(1), image[:, mask[0] == 0].mean(1)
        assert (inside - outside).abs().max() > 0.3
    assert not torch.equal(data[0][0], data[1][0])
    assert torch.equal(data[-1][0], data[7][0])
    with pytest.raises(IndexError):
        data[8]
    small = SyntheticShapes(2, size=16, img_ch=1, seed=3)
    assert small[1][0].shape == (1, 16, 16) and small[1][1].sum() > 0
    with pytest.raises(ValueError, match="multiple of 16"):
        SyntheticShapes(2, size=24)


def test_dice_iou_known_cases():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0] = 1  # the first row: 4 pixels
    perfect = torch.where(target > 0, 5.0, -5.0)
    assert [float(v) for v in dice_iou(perfect, target)] == pytest.approx([1.0, 1.0])
    disjoint = -perfect
    assert [float(v) for v in dice_iou(disjoint, target)] == pytest.approx([0.0, 0.0], abs=1e-6)
    half = torch.full_like(target, -5.0)
    half[0, 0, 0, :2] = 5.0  # 2 of the 4 target pixels ...
    half[0, 0, 1, :2] = 5.0  # ... and 2 outside it: |P| = |T| = 4, |P & T| = 2, |P | T| = 6
    dice, iou = dice_iou(half, target)
    assert float(dice) == pytest.approx(0.5, abs=1e-6) and float(iou) == pytest.approx(1 / 3, abs=1e-6)
    batch_dice, batch_iou = dice_iou(torch.cat([perfect, disjoint]), torch.cat([target, target]))
    assert float(batch_dice) == pytest.approx(0.5) and float(batch_iou) == pytest.approx(0.5)
    empty = torch.zeros_like(target)
    assert [float(v) for v in dice_iou(torch.zeros_like(target), empty)] == [1.0, 1.0]  # logit 0: background


def test_compare_trains_both_models_to_the_same_loss_within_noise(tmp_path):
    result = main(TINY + ["--compare", "--seed", "0", "--out", str(tmp_path)])

    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    history = json.loads((tmp_path / "history.json").read_text())
    assert set(history["models"]) == {"reference", "fastunet"}
    for name, model_history in history["models"].items():
        assert model_history["losses"] == result["models"][name]["losses"] and len(model_history["losses"]) == 20
        assert [e["epoch"] for e in model_history["epochs"]] == [1, 2]
        checkpoint, _ = load_checkpoint_into_reference(tmp_path / f"checkpoint_{name}.pt")
        model = (Reference if name == "reference" else fastunet.U_Net)(3, 1)
        model.load_state_dict(checkpoint["model"])
        # the last epoch's metrics are those of the model it saved, on the 8 validation images after the 40 trained
        want = dice_iou_of(model, Subset(SyntheticShapes(48, size=32, img_ch=3, seed=0), range(40, 48)), batch=4)
        assert [model_history["epochs"][-1][key] for key in ("dice", "iou")] == pytest.approx(want, rel=1e-6)
        assert checkpoint["epoch"] == 2 and checkpoint["losses"] == model_history["losses"]
        assert checkpoint["args"]["compare"] and "state" in checkpoint["optimizer"]
    # Same initialisation: the first step (same weights, same batch) has the same loss up to rounding.
    first = [history["models"][name]["losses"][0] for name in ("reference", "fastunet")]
    assert first[1] == pytest.approx(first[0], rel=1e-4)

    c = history["comparison"]
    assert c["window"] == 4 and c["noise"] > 0
    # noise: the standard error of the difference of two final losses (means of the last 4 steps), from the
    # step-to-step scatter of the losses. Runs of the reference from other seeds (other init, data and order)
    # measured 0.1-2.4x this noise apart; fastunet, from the same init on the same data, must end within 1x.
    assert abs(c["gap"]) <= c["noise"], c
    # Both learn, by far more than the noise: a fastunet that did not learn (final = initial loss) would fail.
    for name in ("reference", "fastunet"):
        assert c[f"final_{name}"] < 0.85 * c[f"initial_{name}"], c
        assert c[f"initial_{name}"] - c[f"final_{name}"] > 3 * c["noise"], c
    reference_losses = history["models"]["reference"]["losses"]
    untrained = compare_losses(reference_losses, [c["initial_fastunet"]] * len(reference_losses))
    assert untrained["gap_over_noise"] > 3


def test_compare_in_exact_mode_gives_the_reference_s_losses_bit_for_bit(tmp_path):
    # Exact mode computes what the reference computes, so the same initialisation, data and order give the same
    # losses, metrics and weights: --compare feeds both models the same.
    result = main(["--device", "cpu", "--size", "16", "--batch", "2", "--epochs", "2", "--steps-per-epoch", "2",
                   "--val-samples", "2", "--no-progress", "--compare", "--exact", "--out", str(tmp_path)])
    reference, fast = result["models"]["reference"], result["models"]["fastunet"]
    assert fast["losses"] == reference["losses"] and len(fast["losses"]) == 4
    assert [e["dice"] for e in fast["epochs"]] == [e["dice"] for e in reference["epochs"]]
    assert result["comparison"]["gap"] == 0 and result["comparison"]["gap_over_noise"] == 0
    want = torch.load(tmp_path / "checkpoint_reference.pt")["model"]
    for key, value in torch.load(tmp_path / "checkpoint_fastunet.pt")["model"].items():
        assert torch.equal(value, want[key]), key


def write_folder(root, count, shape=(48, 64)):
    """``count`` RGB PNG images with masks whose top half is foreground (masks saved as grey RGBA PNGs)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        mask = np.zeros(shape)
        mask[: shape[0] // 2] = 1.0
        image = np.clip(0.3 + 0.4 * mask[..., None] + 0.1 * rng.standard_normal((*shape, 3)), 0, 1)
        matplotlib.image.imsave(root / "images" / f"case{i}.png", image)
        matplotlib.image.imsave(root / "masks" / f"case{i}.png", mask, cmap="gray", vmin=0, vmax=1)


def test_image_mask_folder_reads_resizes_and_binarises(tmp_path):
    write_folder(tmp_path, 3)
    data = ImageMaskFolder(tmp_path, size=32, img_ch=3)
    assert len(data) == 3
    image, mask = data[0]
    assert image.dtype == mask.dtype == torch.float32
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert torch.isfinite(image).all() and image.std() > 0.5
    # 48 x 64 -> 32 x 43 -> centre crop 32 x 32: the top half of the mask stays the top 16 rows
    assert (mask[0, :16] == 1).all() and (mask[0, 16:] == 0).all()
    assert image[:, :16].mean() > image[:, 16:].mean() + 1
    assert ImageMaskFolder(tmp_path, size=16, img_ch=1)[2][0].shape == (1, 16, 16)


def test_image_mask_folder_errors(tmp_path):
    with pytest.raises(DataError, match="images"):
        ImageMaskFolder(tmp_path, size=32)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageMaskFolder(tmp_path, size=32)
    write_folder(tmp_path / "data", 2)
    os.remove(tmp_path / "data" / "masks" / "case1.png")
    with pytest.raises(DataError, match="case1"):
        ImageMaskFolder(tmp_path / "data", size=32)
    with pytest.raises(ValueError, match="multiple of 16"):
        ImageMaskFolder(tmp_path / "data", size=40)


def test_one_epoch_on_an_image_folder(tmp_path):
    write_folder(tmp_path / "data", 5)
    out = tmp_path / "out"
    result = main(["--data", str(tmp_path / "data"), "--device", "cpu", "--size", "32", "--batch", "2",
                   "--epochs", "1", "--no-progress", "--out", str(out)])
    history = result["models"]["fastunet"]
    assert len(history["losses"]) == 2  # 5 images: 1 held out, 4 in 2 batches of 2
    assert (out / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    checkpoint, model = load_checkpoint_into_reference(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["data"] == str(tmp_path / "data")
    trained = fastunet.U_Net(3, 1)
    trained.load_state_dict(checkpoint["model"])
    data = ImageMaskFolder(tmp_path / "data", size=32)
    held_out = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:1].tolist()  # build_datasets' split
    want = dice_iou_of(trained, Subset(data, held_out), batch=2)
    assert [history["epochs"][0][key] for key in ("dice", "iou")] == pytest.approx(want, rel=1e-6)
    x = data[held_out[0]][0].unsqueeze(0)
    model.eval()
    with torch.no_grad():  # the checkpoint in the seed U-Net gives the trained model's logits
        torch.testing.assert_close(model(x), trained(x), rtol=1e-4, atol=1e-4)
