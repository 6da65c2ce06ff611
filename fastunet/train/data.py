"""The training data: the synthetic shapes, an images/ + masks/ folder, and the loaders over them."""

import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A problem with the training data that its user can fix (a missing, unreadable or unpaired file, a size or
    channel count that does not fit), with a one-line message naming the file and what to do;
    ``python -m fastunet.train`` prints it as its ``error:`` line instead of a traceback."""


def _check_size(size):
    if size <= 0 or size % 16:
        raise ValueError(f"size must be a positive multiple of 16 (four 2x2 max-pools in the U-Net), got {size}")


def _standardise(image):
    """Per-image zero mean, unit standard deviation (float32 ``[C, H, W]``)."""
    return (image - image.mean()) / image.std().clamp_min(1e-3)


class SyntheticShapes(Dataset):
    """Images of 1-3 filled shapes (discs, rectangles, equilateral triangles) and the masks of their union.

    Item ``i`` is a pair ``(image, mask)``: image float32 ``[img_ch, size, size]`` (a per-channel colour gradient
    plus Gaussian noise, shapes in colours that differ from the background by 0.35-0.75 per channel, then
    standardised per image), mask float32 ``[1, size, size]`` of 0 and 1, never empty. It is drawn with a
    torch.Generator seeded from ``(seed, i)`` alone: the same on every call, process and DataLoader worker. The
    generator keeps 32 bits of its seed: item i gets ``(seed * 0x9E3779B9 + i) mod 2**32``, distinct for the items of
    one seed, and for seeds up to 100 apart at least 2 * 10**7 items away from the other seed's.
    """

    def __init__(self, length, size=64, img_ch=3, seed=0):
        _check_size(size)
        if length < 0 or img_ch < 1:
            raise ValueError(f"need length >= 0 and img_ch >= 1, got length={length}, img_ch={img_ch}")
        self.length, self.size, self.img_ch, self.seed = length, size, img_ch, seed
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self.yy, self.xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {self.length}")
        index %= self.length
        gen = torch.Generator().manual_seed((self.seed * 0x9E3779B9 + index) & 0xFFFFFFFF)

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(shape, generator=gen)

        xx, yy, ch = self.xx, self.yy, self.img_ch
        base = uniform(0.2, 0.8, ch, 1, 1)
        angle = uniform(0, 2 * math.pi)
        ramp = xx * torch.cos(angle) + yy * torch.sin(angle)
        image = base + uniform(-0.3, 0.3, ch, 1, 1) * (ramp - ramp.mean())
        union = torch.zeros(self.size, self.size, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            kind = int(torch.randint(0, 3, (), generator=gen))
            cx, cy = uniform(0.2, 0.8), uniform(0.2, 0.8)
            if kind == 0:
                shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= uniform(0.1, 0.25) ** 2
            elif kind == 1:
                shape = ((xx - cx).abs() <= uniform(0.08, 0.25)) & ((yy - cy).abs() <= uniform(0.08, 0.25))
            else:
                shape = self._triangle(cx, cy, uniform(0.12, 0.3), uniform(0, 2 * math.pi))
            sign = torch.where(torch.rand(ch, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
            colour = base + sign * uniform(0.35, 0.75, ch, 1, 1)
            image = torch.where(shape, colour, image)
            union |= shape
        image = image + 0.05 * torch.randn(image.shape, generator=gen)
        return _standardise(image), union.float().unsqueeze(0)

    def _triangle(self, cx, cy, radius, rotation):
        """The equilateral triangle with circumradius ``radius`` around ``(cx, cy)`` (contains its incircle)."""
        angles = rotation + torch.arange(3) * (2 * math.pi / 3)
        vx, vy = cx + radius * torch.cos(angles), cy + radius * torch.sin(angles)
        inside = torch.ones_like(self.xx, dtype=torch.bool)
        for i in range(3):
            j = (i + 1) % 3
            inside &= (vx[j] - vx[i]) * (self.yy - vy[i]) - (vy[j] - vy[i]) * (self.xx - vx[i]) >= 0
        return inside


def _image_files(folder):
    """stem -> path of the png/jpg files in ``folder``."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as error:
        raise DataError(f"cannot list {folder} ({_reason(error)}); make it a readable folder") from error
    files = {}
    for entry in entries:
        stem, ext = os.path.splitext(entry)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in files:
                raise DataError(f"{folder} holds two files of the stem {stem}, {os.path.basename(files[stem])} and "
                                f"{entry}: images and masks pair by stem, keep one of them")
            files[stem] = os.path.join(folder, entry)
    return files


def _reason(error):
    """An exception's message on one line (the ``error:`` line is one line)."""
    return " ".join(str(error).split()) or type(error).__name__


def _read_image(path):
    """The file as float32 ``[C, H, W]`` in [0, 1] (8-bit by 255, 16-bit by 65535), read with PIL; DataError if
    PIL cannot read it (not an image, truncated, unreadable)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I", "F"):  # palette, 1-bit, CMYK, ...
                image = image.convert("RGB")
            array = np.array(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL's reading errors
        reason = _reason(error).replace(f" {str(path)!r}", "")  # PIL's messages may name the file again
        raise DataError(f"cannot read {path} as an image ({reason}); replace it, or remove it and its image or "
                        f"mask") from error
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.dtype.kind in "ui":  # 16-bit PNGs (PIL modes I;16 and I)
        array = array / 65535.0
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _to_channels(image, channels, path):
    """``[C, H, W]`` -> ``[channels, H, W]``: alpha dropped, grey repeated, colours averaged for one channel."""
    if image.shape[0] == channels:
        return image
    colour = image[:3] if image.shape[0] >= 3 else image[:1]  # RGB(A) or L(A): alpha dropped
    if channels == 1:
        return colour.mean(0, keepdim=True)
    if colour.shape[0] == 1:
        return colour.expand(channels, -1, -1)
    if colour.shape[0] == channels:
        return colour
    possible = " or ".join(str(count) for count in sorted({1, 3, image.shape[0]}))
    raise DataError(f"{path} has {image.shape[0]} channels, which make {possible} channels, not the {channels} that "
                    f"--img-ch {channels} asks: set --img-ch to one of those")


def _resize_crop(image, size):
    """``[C, h, w]`` -> ``[C, size, size]``: shorter side resized to ``size`` (bilinear, antialiased), centre crop."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image.unsqueeze(0), size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=True).squeeze(0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top:top + size, left:left + size]


class ImageMaskFolder(Dataset):
    """Pairs ``root/images/<stem>.png|jpg`` with the mask of the same stem in ``root/masks/``.

    Item ``i`` (files in stem order) is ``(image, mask)``: image float32 ``[img_ch, size, size]`` standardised
    per image, mask float32 ``[1, size, size]`` of 0 and 1. Files are read with PIL, scaled to [0, 1], resized so
    that the shorter side is ``size`` (bilinear, antialiased) and centre-cropped to a square. Images: alpha is
    dropped, grey repeated to ``img_ch`` channels, colours averaged for ``img_ch=1``. Masks: colours averaged,
    foreground where > 0.5. A folder or file its user must fix raises DataError: here a missing folder, no images,
    an image without a mask; when an item is read, a file PIL cannot read or an image and mask of other sizes.
    """

    def __init__(self, root, size=64, img_ch=3):
        _check_size(size)
        self.root, self.size, self.img_ch = root, size, img_ch
        if importlib.util.find_spec("PIL") is None:  # matplotlib, which draws loss.png, depends on it
            raise DataError("reading an image folder needs Pillow: pip install pillow")
        if not os.path.isdir(root):
            raise DataError(f"{root} is not a folder: --data takes 'synthetic' or a folder with images/ and masks/")
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise DataError(f"{folder} is missing: a data folder holds images/ and masks/, with a mask of the "
                                f"same file name (stem) for every image")
        images, masks = _image_files(image_dir), _image_files(mask_dir)
        if not images:
            raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}): put the training images "
                            f"there and their masks in {mask_dir}")
        missing = sorted(set(images) - set(masks))
        if missing:
            others = f" (and {len(missing) - 1} more of the {len(images)} images)" if len(missing) > 1 else ""
            raise DataError(f"{images[missing[0]]} has no mask{others}: add {mask_dir}/{missing[0]}.png (or .jpg) or "
                            f"remove the image")
        self.pairs = [(images[stem], masks[stem]) for stem in sorted(images)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, mask_path = self.pairs[index]
        image, mask = _read_image(image_path), _read_image(mask_path)
        if image.shape[1:] != mask.shape[1:]:
            raise DataError(f"{image_path} is {tuple(image.shape[1:])} (H, W) but its mask {mask_path} is "
                            f"{tuple(mask.shape[1:])}: a mask has its image's size")
        image = _resize_crop(_to_channels(image, self.img_ch, image_path), self.size)
        mask = _resize_crop(_to_channels(mask, 1, mask_path), self.size)
        return _standardise(image), (mask > 0.5).float()


def build_datasets(args, world):
    """(training set, validation set): synthetic items [0, n) and [n, n + val), or a seeded split of the folder."""
    if args.data == "synthetic":
        n_train = args.train_samples or args.steps_per_epoch * args.batch * world
        full = SyntheticShapes(n_train + args.val_samples, args.size, args.img_ch, args.seed)
        return Subset(full, range(n_train)), Subset(full, range(n_train, len(full)))
    full = ImageMaskFolder(args.data, args.size, args.img_ch)
    n_val = args.val_samples if args.val_samples is not None else max(1, len(full) // 5)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return Subset(full, order[n_val:]), Subset(full, order[:n_val])


def build_loaders(train_set, val_set, args, device, rank, world):
    """Loaders with the data order fixed by ``args.seed``: a seeded RandomSampler, or a DistributedSampler under
    torchrun; full batches only (BatchNorm). Validation (None without images): every world-th image from ``rank``."""
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    options = {"batch_size": args.batch, "num_workers": args.workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **options)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), **options) if len(val_set) else None
    return train_loader, val_loader
