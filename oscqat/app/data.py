"""Datasets for `oscqat train`: Fashion-MNIST from its IDX files, scikit-learn's digits, or an ImageFolder tree.

Everything is loaded into memory as float tensors (N, C, H, W), normalised per channel with the training set's
statistics. No download, no torchvision: the IDX parser is below and ImageFolder images are read with PIL.
Batches come from `Batches`, whose order depends only on (seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple = ()
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])


# ----------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed, detected by its magic bytes, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read IDX file {path}: {e.strerror or e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e}); expected a gzip-compressed IDX file") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty file'}); expected "
                         f"the Fashion-MNIST/MNIST IDX format (magic 0x00000801 labels, 0x00000803 images)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX file is truncated or corrupt: header says shape {dims} "
                         f"({count * dtype.itemsize} bytes of data), found {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / cand).is_file():
            return directory / cand
    return None


def default_fashion_mnist_dir() -> str | None:
    env = os.environ.get("OSCQAT_FASHION_MNIST")
    for d in ((env,) if env else ()) + FASHION_MNIST_DIRS:
        if d and _find(Path(d), _FMNIST_FILES["train"][0]) is not None:
            return d
    return None


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    data_dir = data_dir or default_fashion_mnist_dir()
    if data_dir is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {', '.join(FASHION_MNIST_DIRS)} (Debian package dataset-fashion-mnist); "
            f"pass --data-dir DIR holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], or use --dataset digits")
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--data-dir {d} is not a directory; expected a folder with the four Fashion-MNIST "
                                f"IDX files (train-images-idx3-ubyte[.gz], ...)")
    arrays = {}
    for split, (img, lab) in _FMNIST_FILES.items():
        paths = [_find(d, img), _find(d, lab)]
        missing = [s for s, p in zip((img, lab), paths) if p is None]
        if missing:
            raise FileNotFoundError(f"{d}: missing {', '.join(m + '[.gz]' for m in missing)}; expected the four "
                                    f"Fashion-MNIST IDX files {', '.join(sum(_FMNIST_FILES.values(), ()))}")
        x, y = read_idx(paths[0]), read_idx(paths[1])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{d}: {split} images have shape {x.shape} and labels {y.shape}; expected (N, H, W) "
                             f"images and (N,) labels with the same N")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{paths[1]}: labels outside 0..9")
        arrays[split] = (torch.from_numpy(x.astype(np.float32) / 255.0)[:, None], torch.from_numpy(y.astype(np.int64)))
    return _normalise(Dataset("fashion-mnist", *arrays["train"], *arrays["test"], FASHION_MNIST_CLASSES,
                              {"data_dir": str(d.resolve())}))


# ----------------------------------------------------------------------------------------------- digits
def load_digits(size: int = 8, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, bundled with scikit-learn), at 8x8 or bilinearly resized to
    `size`; a fixed stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits as _ld
    except ImportError as e:
        raise RuntimeError("--dataset digits needs scikit-learn (pip install scikit-learn)") from e
    d = _ld()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(1234)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: len(idx) // 5]] = True
    return _normalise(Dataset("digits", x[~test], y[~test], x[test], y[test], tuple(str(i) for i in range(10)),
                              {"image_size": size}))


# ----------------------------------------------------------------------------------------------- ImageFolder
def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_tree(root: Path, classes: list[str], size: int, mode: str):
    from PIL import Image, UnidentifiedImageError
    xs, ys = [], []
    for ci, c in enumerate(classes):
        cdir = root / c
        if not cdir.is_dir():
            continue
        for f in sorted(cdir.rglob("*")):
            if f.suffix.lower() not in _IMG_EXT or not f.is_file():
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((size, size), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{f}: cannot read image ({e}); expected a readable image file") from e
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(ci)
    if not xs:
        return torch.zeros(0, 1 if mode == "L" else 3, size, size), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


def _image_mode(root: Path) -> str:
    from PIL import Image
    for f in root.rglob("*"):
        if f.suffix.lower() in _IMG_EXT and f.is_file():
            try:
                with Image.open(f) as im:
                    return "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
            except OSError:
                continue
    return "RGB"


def load_image_folder(root: str | os.PathLike, size: int = 28, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """ImageFolder layout: ROOT/<class>/<image>, or ROOT/train/<class>/... with ROOT/val (or test)/<class>/...
    Images are resized to size x size; grayscale if the first image is, else RGB. Without a val/test split a
    fixed `val_fraction` of each class is held out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; expected --dataset fashion-mnist, digits, "
                                f"or a folder in ImageFolder layout (ROOT/<class>/<image>)")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = next((root / n for n in ("val", "valid", "validation", "test") if (root / n).is_dir()), None)
    if train_root == root:
        val_root = None
    classes = [p.name for p in _class_dirs(train_root)]
    if len(classes) < 2:
        raise ValueError(f"{train_root}: found {len(classes)} class folder(s); ImageFolder layout needs at least two "
                         f"sub-folders, one per class, each holding images ({', '.join(_IMG_EXT)})")
    mode = _image_mode(train_root)
    x, y = _read_tree(train_root, classes, size, mode)
    if len(y) == 0:
        raise ValueError(f"{train_root}: no image files ({', '.join(_IMG_EXT)}) in the class folders "
                         f"{', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}")
    if val_root is not None:
        tx, ty = _read_tree(val_root, classes, size, mode)
        if len(ty) == 0:
            raise ValueError(f"{val_root}: no images in the class folders {', '.join(classes[:5])}")
    else:
        g = torch.Generator().manual_seed(1234 + seed)
        test = torch.zeros(len(y), dtype=torch.bool)
        for c in range(len(classes)):
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            test[idx[: int(len(idx) * val_fraction)]] = True
        if test.all() or not test.any():
            test[:] = False
            test[:: 5] = True
        x, y, tx, ty = x[~test], y[~test], x[test], y[test]
    return _normalise(Dataset(root.name, x, y, tx, ty, tuple(classes), {"root": str(root.resolve()),
                                                                        "image_size": size}))


# ----------------------------------------------------------------------------------------------- common
def _normalise(ds: Dataset) -> Dataset:
    mean = ds.train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = ds.train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    ds.train_x = (ds.train_x - mean) / std
    ds.test_x = (ds.test_x - mean) / std
    ds.info.update(mean=mean.flatten().tolist(), std=std.flatten().tolist())
    return ds


def _subset(x, y, n: int | None, seed: int):
    if n is None or n <= 0 or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + seed))[:n]
    idx, _ = idx.sort()
    return x[idx], y[idx]


def load_dataset(name: str = "auto", data_dir: str | None = None, *, subset: int | None = None,
                 test_subset: int | None = None, image_size: int | None = None, seed: int = 0) -> Dataset:
    """`name`: 'auto' (Fashion-MNIST when its files are found, else digits), 'fashion-mnist', 'digits', or a path
    to an ImageFolder tree. `subset`/`test_subset` keep a fixed random subset of the train/test split; one larger
    than the split keeps all of it (a clamp that `describe` states)."""
    requested = name
    if name == "auto":
        name = "fashion-mnist" if (data_dir or default_fashion_mnist_dir()) else "digits"
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        ds = load_fashion_mnist(data_dir)
        if image_size and image_size != 28:   # reduced-size runs: area-resample the normalised images
            for k in ("train_x", "test_x"):
                setattr(ds, k, torch.nn.functional.interpolate(getattr(ds, k), size=(image_size, image_size),
                                                               mode="area" if image_size < 28 else "bilinear"))
            ds.info["image_size"] = image_size
    elif name == "digits":
        ds = load_digits(image_size or 8)
    elif os.sep in name or os.path.isdir(name) or name.startswith("."):
        ds = load_image_folder(name, image_size or 28, seed=seed)
    elif data_dir and name in ("folder", "imagefolder", "image-folder"):
        ds = load_image_folder(data_dir, image_size or 28, seed=seed)
    else:
        raise FileNotFoundError(f"unknown dataset {name!r}: expected 'fashion-mnist', 'digits', or the path of a "
                                f"folder in ImageFolder layout (ROOT/<class>/<image>)")
    full = (len(ds.train_y), len(ds.test_y))
    ds.train_x, ds.train_y = _subset(ds.train_x, ds.train_y, subset, seed)
    ds.test_x, ds.test_y = _subset(ds.test_x, ds.test_y, test_subset, seed)
    if ds.name == "fashion-mnist":
        spec, path = "fashion-mnist", ds.info["data_dir"]
    elif ds.name == "digits":
        spec, path = "digits", "sklearn.datasets.load_digits (bundled with scikit-learn)"
    else:
        spec = path = ds.info["root"]
    ds.info.update(name=ds.name, spec=spec, path=path, image_size=list(ds.image_size), in_channels=ds.in_channels,
                   num_classes=ds.num_classes, train_size=len(ds.train_y), test_size=len(ds.test_y),
                   full_train_size=full[0], full_test_size=full[1], subset=subset, test_subset=test_subset)
    if requested == "auto" and ds.name == "digits":
        ds.info["why"] = (f"--dataset auto: Fashion-MNIST is not installed in {', '.join(FASHION_MNIST_DIRS)} "
                          f"(Debian package dataset-fashion-mnist; or --dataset fashion-mnist --data-dir DIR)")
    return ds


def describe(info: dict) -> str:
    """One line naming a dataset from its `Dataset.info` (as stored in checkpoints and reports)."""
    size = info.get("image_size")
    size = "x".join(str(v) for v in size) if isinstance(size, (list, tuple)) else str(size or "?")
    parts = [f"{info.get('name', '?')} ({info.get('path', '?')})", f"{info.get('in_channels', '?')}x{size} images"]
    for split, key in (("train", "subset"), ("test", "test_subset")):
        if f"{split}_size" not in info:
            continue
        n, full, asked = info[f"{split}_size"], info.get(f"full_{split}_size"), info.get(key)
        if asked and full is not None and asked > full:     # a subset larger than the data: all of it, said so
            parts.append(f"all {n} {split} (--{key.replace('_', '-')} {asked} is more than there are)")
        else:
            parts.append(f"{n}{f' of {full}' if full not in (None, n) else ''} {split}")
    return ", ".join(parts)


class Batches:
    """Mini-batches of in-memory tensors. With `shuffle`, the order of epoch `e` is a permutation drawn from
    (seed, e) only, so it does not depend on what ran before (resume-safe). `augment` adds a random horizontal
    flip + 2-pixel shift from the same generator."""

    def __init__(self, x, y, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 augment: bool = False, device="cpu", max_batches: int | None = None,
                 shard: tuple[int, int] | None = None):
        """`shard=(rank, world)`: a distributed sampler over the same global batches: every rank draws the same
        permutation and takes its contiguous part of each global batch of `batch_size` (`torch.tensor_split`)."""
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.shard = shard
        self.x, self.y, self.bs = x, y, batch_size
        self.shuffle, self.seed, self.drop_last, self.augment = shuffle, seed, drop_last, augment
        self.device = torch.device(device)
        self.max_batches = max_batches
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.y) // self.bs if self.drop_last else -(-len(self.y) // self.bs)
        n = max(n, 1 if len(self.y) else 0)
        return min(n, self.max_batches) if self.max_batches else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.y)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.bs:(b + 1) * self.bs]
            x = self.x[idx]
            if self.augment:
                x = _augment(x, g)      # on the global batch: the generator advances alike on every rank
            if self.shard is not None:
                rank, world = self.shard
                keep = torch.arange(len(idx)).tensor_split(world)[rank]
                x, idx = x[keep], idx[keep]
            yield x.to(self.device, non_blocking=True), self.y[idx].to(self.device, non_blocking=True)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Per image: a horizontal flip with probability 1/2, then a random crop of the image zero-padded by `pad`
    pixels ("zero": the normalised images' minimum, their background); pad=0: the flip only."""
    n, c, h, w = x.shape
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None].expand(n, c, h, w + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :].expand(n, c, h, w)
    return torch.gather(xp, 3, cols)
