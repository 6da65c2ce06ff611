"""Data folders a user got wrong: ``python -m fastunet.train --data <folder>`` ends with one ``error:`` line on
stderr naming the file and what to do, exit status 2, no traceback (also for an error met in a DataLoader worker),
and ImageMaskFolder, called from Python, raises DataError with that message."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from fastunet.train import DataError, ImageMaskFolder, main

Image = pytest.importorskip("PIL.Image")

PROG_ERROR = "python -m fastunet.train: error: "
# 2 images of 20 x 24 in one batch of 2 at 16 x 16, nothing held out: the first step reads every file
OPTIONS = ["--device", "cpu", "--size", "16", "--batch", "2", "--epochs", "1", "--val-samples", "0", "--no-progress",
           "--log-every", "0"]
SUBPROCESS_TIMEOUT_S = 300


def write_folder(root, count=2, shape=(20, 24)):
    """``count`` random RGB images with random 0/255 masks of the same stem: {stem: (image path, mask path)}."""
    rng = np.random.default_rng()
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    pairs = {}
    for i in range(count):
        image, mask = root / "images" / f"case{i}.png", root / "masks" / f"case{i}.png"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(image)
        Image.fromarray(np.where(rng.random(shape) < 0.5, 255, 0).astype(np.uint8)).save(mask)
        pairs[f"case{i}"] = (image, mask)
    return pairs


def train_in_subprocess(data, out, *options):
    return subprocess.run([sys.executable, "-m", "fastunet.train", "--data", str(data), *OPTIONS, *options,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def the_error_line(returncode, stderr, out):
    """The one ``error:`` line of a run that ended on a data error (exit status 2, no traceback, no checkpoint)."""
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(PROG_ERROR), stderr
    assert stderr.rstrip().endswith(errors[0]), stderr
    assert not (out / "checkpoint.pt").exists()
    return errors[0][len(PROG_ERROR):]


def corrupt_image(pairs):
    image, _ = pairs["case1"]
    image.write_bytes(np.random.default_rng().integers(0, 256, 200, dtype=np.uint8).tobytes())
    return str(image), "cannot read"


def missing_mask(pairs):
    image, mask = pairs["case1"]
    os.remove(mask)
    return str(image), "has no mask"


def mask_of_another_size(pairs):
    image, mask = pairs["case0"]
    Image.fromarray(np.zeros((24, 20), dtype=np.uint8)).save(mask)
    return f"{image} is (20, 24) (H, W) but its mask {mask} is (24, 20)", "a mask has its image's size"


def empty_folder(pairs):
    for image, mask in pairs.values():
        os.remove(image)
        os.remove(mask)
    return str(image.parent), "holds no images"


@pytest.mark.parametrize("break_folder, workers", [(corrupt_image, 1), (missing_mask, 0),
                                                   (mask_of_another_size, 0), (empty_folder, 0)])
def test_a_broken_folder_ends_the_command_with_one_error_line(tmp_path, break_folder, workers):
    """The command as a user runs it; the unreadable file is met in a DataLoader worker (--workers 1)."""
    fragments = break_folder(write_folder(tmp_path / "data"))
    run = train_in_subprocess(tmp_path / "data", tmp_path / "out", "--workers", str(workers))
    message = the_error_line(run.returncode, run.stderr, tmp_path / "out")
    assert all(fragment in message for fragment in fragments), message


def truncated_mask(pairs):
    _, mask = pairs["case0"]
    mask.write_bytes(mask.read_bytes()[:60])
    return str(mask), "cannot read"


def empty_image_file(pairs):
    image, _ = pairs["case0"]
    image.write_bytes(b"")
    return str(image), "cannot read"


def no_masks_folder(pairs):
    for _, mask in pairs.values():
        os.remove(mask)
    os.rmdir(mask.parent)
    return str(mask.parent), "is missing"


def not_a_folder(pairs):
    root = pairs["case0"][0].parent.parent
    os.rename(root, root.with_name("moved"))
    return str(root), "is not a folder"


def two_files_of_one_stem(pairs):
    image, _ = pairs["case0"]
    Image.open(image).save(image.with_suffix(".jpg"))
    return "case0.jpg", "case0.png", "keep one"


def fewer_images_than_a_batch(pairs):
    image, mask = pairs["case1"]
    os.remove(image)
    os.remove(mask)
    return str(image.parent.parent), "fewer than one batch of 2"


def channels_it_cannot_make(pairs):
    image, _ = pairs["case1"]  # RGB: 1 or 3 channels, not 2 (the first of the batch's images is named)
    return str(image.parent), "has 3 channels", "--img-ch 2"


@pytest.mark.parametrize("break_folder", [truncated_mask, empty_image_file, no_masks_folder, not_a_folder,
                                          two_files_of_one_stem, fewer_images_than_a_batch, channels_it_cannot_make])
def test_main_turns_each_data_error_into_one_error_line(tmp_path, capsys, break_folder):
    """main(), the command's function, in this process (cheaper than a process per case)."""
    fragments = break_folder(write_folder(tmp_path / "data"))
    img_ch = ["--img-ch", "2"] if break_folder is channels_it_cannot_make else []
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "data"), *OPTIONS, *img_ch, "--out", str(tmp_path / "out")])
    message = the_error_line(exit_info.value.code, capsys.readouterr().err, tmp_path / "out")
    assert all(fragment in message for fragment in fragments), message


def test_the_dataset_raises_data_error_with_the_command_s_message(tmp_path):
    pairs = write_folder(tmp_path / "data")
    path, _ = corrupt_image(pairs)
    data = ImageMaskFolder(tmp_path / "data", size=16)
    with pytest.raises(DataError, match="cannot read") as error_info:
        data[1]
    assert isinstance(error_info.value, ValueError) and path in str(error_info.value)
    assert "\n" not in str(error_info.value)
    missing_mask(pairs)
    with pytest.raises(DataError, match="case1.png has no mask"):
        ImageMaskFolder(tmp_path / "data", size=16)
