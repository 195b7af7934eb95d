"""Real image datasets, split into train / val / test, with the paper's CIFAR augmentation.

    splits = ek.data.load("fashion-mnist-mini")       # embedded in the package: no download, no root
    splits = ek.data.load("cifar10", root, download=True, val_fraction=0.1, seed=0)
    splits.train, splits.val, splits.test               # ImageDataset: (float32 [C, H, W] normalized, int64 label)
    splits.num_classes, splits.in_channels, splits.image_size, splits.classes
    images, labels = splits.val.tensors                 # the whole set, normalized, never augmented

Names (`DATASETS`): "fashion-mnist-mini", "fashion-mnist" (the four IDX files), "cifar10-subset"
(cifar10_subset.npz), "cifar10" (the official python batches, through torchvision) and "imagefolder"
(root/train/<class>/*.png and optionally root/test/ or root/val/; or just root/<class>/*).
The training set is split into train and val with a seeded permutation. The first four are held in
memory, normalized per channel with the train split's statistics; only train augments (random flip
+ shift by up to 4 px). "imagefolder" is streamed from disk (FolderDataset: each image read when
accessed) with ImageNet's transforms and statistics, at `image_size` (default 224).

The older helpers stay: they return TensorDatasets normalized with the usual published statistics.

    train = ek.data.cifar10_subset(root, "train")     # float32 [N, 3, 32, 32], int64 labels
    test = ek.data.fashion_mnist(root, "test")        # float32 [N, 1, 28, 28]

Errors are one line saying what to do: ValueError for bad arguments and unreadable or empty data,
FileNotFoundError for missing folders or files, RuntimeError for a failed download.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DATASETS", "ImageDataset", "FolderDataset", "UnreadableImage", "Splits", "load", "cifar10_subset",
           "fashion_mnist", "find_root", "SPLITS"]

SPLITS = ("train", "test")
DATASETS = ("fashion-mnist-mini", "fashion-mnist", "cifar10-subset", "cifar10", "imagefolder")
# per-channel mean / std of the full training sets (the usual published values)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MINI_PATH = Path(__file__).parent / "datasets" / "fashion_mnist_mini.npz"
SHIFT = 4  # the augmentation's largest shift, in pixels
# image folders: ImageNet's statistics and evaluation crop (what pretrained weights were trained with)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 224  # imagefolder's default image_size
CROP_FRACTION = 0.875  # evaluation: the shorter side resized to image_size / 0.875, then the centre crop


def find_root(*candidates) -> Path | None:
    """The first folder holding a dataset: $EASIER_KERNELS_DATA, then the candidates; None if none does."""
    for root in (os.environ.get("EASIER_KERNELS_DATA"), *candidates):
        if root and any((Path(root) / folder).is_dir() for folder in ("cifar10-subset", "fashion-mnist")):
            return Path(root)
    return None


# ---- the dataset and the splits


class ImageDataset(Dataset):
    """uint8 images [N, C, H, W] with int64 labels, normalized per channel on access.

    With `augment`, each access flips horizontally with p=0.5 and shifts by up to SHIFT pixels in
    each direction, zero-filled (RandomCrop(size, padding=SHIFT) then RandomHorizontalFlip), drawing
    from torch's global RNG so that restoring its state replays the same samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, *, augment: bool = False,
                 classes: list[str] | None = None, indices: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"ImageDataset wants uint8 images [N, C, H, W] and labels [N], "
                             f"not {images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.classes = augment, classes
        self.indices = indices  # positions in the set this one was taken from (None: the whole set)
        # (x / 255 - mean) / std as one multiply-add
        std32 = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1 / (255 * std32)
        self._offset = -torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std32
        self._padded_images = None
        if augment:  # made here rather than on first use so that DataLoader workers share one copy
            self._padded()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self._flip_shift(i) if self.augment else self.images[i]
        return self.normalize(image), self.labels[i]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] to float32 (x / 255 - mean) / std: the same arithmetic for one image or all."""
        return torch.addcmul(self._offset, images.float(), self._scale)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized float32 images [N, C, H, W], int64 labels), never augmented, as TensorDataset has."""
        return self.normalize(self.images), self.labels

    def _flip_shift(self, i) -> torch.Tensor:
        """Image i shifted by -SHIFT..SHIFT pixels each way (a crop of it zero-padded by SHIFT, at a uniform
        offset in [0, 2 * SHIFT]) and flipped horizontally with p=0.5: two views and at most one copy."""
        side = 2 * SHIFT + 1
        draw = int(torch.randint(2 * side * side, ()))  # one draw: flip, row offset, column offset
        flip, (dy, dx) = draw >= side * side, divmod(draw % side ** 2, side)
        height, width = self.images.shape[-2:]
        crop = self._padded()[i, :, dy:dy + height, dx:dx + width]
        return crop.flip(-1) if flip else crop

    def _padded(self) -> torch.Tensor:
        """The images zero-padded by SHIFT on each side, made once (val and test never need them)."""
        if self._padded_images is None:
            self._padded_images = torch.nn.functional.pad(self.images, (SHIFT,) * 4)
        return self._padded_images


class UnreadableImage(ValueError):
    """An image file that cannot be decoded, found when a FolderDataset reads it. A DataLoader
    worker re-raises it with its traceback as the message; str() is still the one line naming the file."""

    def __str__(self) -> str:
        text = super().__str__().strip()
        if "\n" not in text:
            return text
        # from a worker: "Caught UnreadableImage in DataLoader worker ...", the original line ends the traceback
        last = text.splitlines()[-1]
        return last.partition("UnreadableImage: ")[2] or last


class FolderDataset(Dataset):
    """Image files read from disk when accessed (a folder too large for memory), as RGB (grayscale
    and palette images converted), normalized with ImageNet's mean / std: float32 [3, size, size].

    With `augment` (training): RandomResizedCrop(size) and RandomHorizontalFlip, drawing from torch's
    global RNG so that restoring its state replays the same samples; otherwise (evaluation) the
    shorter side resized to round(size / 0.875), then CenterCrop(size). An image that cannot be
    decoded raises UnreadableImage naming it."""

    def __init__(self, samples, size: int, *, augment: bool = False, classes: list[str] | None = None,
                 indices: torch.Tensor | None = None):
        # one numpy array rather than a list of str: forked workers then share it (no refcount writes)
        self.paths = np.array([str(path) for path, _ in samples])
        self.labels = torch.tensor([int(label) for _, label in samples], dtype=torch.int64)
        self.size, self.augment, self.classes, self.indices = size, augment, classes, indices
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(_open_rgb(Path(str(self.paths[i])))), self.labels[i]

    @property
    def transform(self):
        """The torchvision transform, made on first use: built in each process rather than pickled
        into DataLoader workers (a spawned worker then imports torchvision through compat)."""
        if self._transform is None:
            T = _torchvision().transforms
            crop = ([T.RandomResizedCrop(self.size), T.RandomHorizontalFlip()] if self.augment
                    else [T.Resize(round(self.size / CROP_FRACTION)), T.CenterCrop(self.size)])
            self._transform = T.Compose([*crop, T.ToTensor(), T.Normalize(self.mean, self.std)])
        return self._transform

    def __getstate__(self):
        return {**self.__dict__, "_transform": None}


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes: a truncated file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # unknown format, truncated
        raise UnreadableImage(f"cannot read the image {path} ({_one_line(e)}); remove or replace it") from e


@dataclass
class Splits:
    name: str
    train: ImageDataset | FolderDataset
    val: ImageDataset | FolderDataset
    test: ImageDataset | FolderDataset | None
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]


def load(name: str, root=None, *, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
         augment: bool = True, image_size: int | None = None) -> Splits:
    """The dataset `name` (one of DATASETS) split into train / val (from the training set) and test."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (both excluded), not {val_fraction}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, not {image_size!r}")
    native = {"fashion-mnist-mini": 28, "fashion-mnist": 28, "cifar10-subset": 32, "cifar10": 32}.get(name)
    if native is not None and image_size not in (None, native):
        raise ValueError(f"{name} images are {native}x{native}; image_size={image_size} applies to imagefolder only")
    if name == "imagefolder":
        return _imagefolder(root, download, image_size or IMAGE_SIZE, val_fraction, seed, augment)
    train, test, classes = _READERS[name](root, download)
    images, labels = train
    _check_labels(name, len(classes), labels, None if test is None else test[1])
    val_idx, train_idx = _split(name, len(labels), val_fraction, seed)
    train_images = images[train_idx]
    mean, std = channel_stats(train_images)
    return Splits(
        name,
        train=ImageDataset(train_images, labels[train_idx], mean, std, augment=augment, indices=train_idx, classes=classes),
        val=ImageDataset(images[val_idx], labels[val_idx], mean, std, indices=val_idx, classes=classes),
        test=None if test is None else ImageDataset(*test, mean, std, classes=classes),
        num_classes=len(classes), in_channels=images.shape[1], image_size=images.shape[2], classes=classes)


def _split(name: str, size: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(val indices, train indices) of a training set of `size` images, each sorted: a seeded permutation."""
    if size < 2:
        raise ValueError(f"{name}: the training set holds {size} image(s); a train/val split needs at least 2")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(round(size * val_fraction), 1), size - 1)  # an image on each side at least
    return order[:n_val].sort().values, order[n_val:].sort().values


def _check_labels(name: str, num_classes: int, *label_sets) -> None:
    for split, labels in zip(("training", "test"), label_sets):
        if labels is not None and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ValueError(f"{name}: {split} labels outside 0..{num_classes - 1} ({num_classes} classes); is the data corrupt?")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] on the 0-1 scale, in float64.
    A histogram of the 256 values makes it exact without a float copy of the images."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt().item()
        means.append(mean.item())
        stds.append(std or 1.0)  # a constant channel: leave its scale alone rather than divide by 0
    return tuple(means), tuple(stds)


# ---- readers: each returns (train, test or None, classes), with train / test = (uint8 [N, C, H, W], int64 [N])


def _fashion_mnist_mini(root, download):
    if not MINI_PATH.is_file():  # package data left out of an install
        raise FileNotFoundError(f"the embedded subset {MINI_PATH} is missing: reinstall easier-kernels with its package data")
    arrays = _npz(MINI_PATH, ("train_images", "train_labels", "test_images", "test_labels"))
    return (*(_checked(arrays[f"{s}_images"], arrays[f"{s}_labels"], MINI_PATH) for s in SPLITS), FASHION_MNIST_CLASSES)


_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FASHION_WHAT = "the four Fashion-MNIST *-idx?-ubyte.gz files"


def _fashion_mnist(root, download):
    root = _needs_root("fashion-mnist", root, _FASHION_WHAT, download)
    folder = _fashion_folder(root)
    if folder is None and download:  # torchvision fetches all four files into root/FashionMNIST/raw/
        _downloading("Fashion-MNIST", root, lambda tv: tv.datasets.FashionMNIST(root, train=True, download=True))
        folder = _fashion_folder(root)
    if folder is None:
        names = ", ".join(_FASHION_FILES["train"] + _FASHION_FILES["test"])
        raise FileNotFoundError(f"no Fashion-MNIST files in {root}: expected {names} (.gz or not) in it, "
                                f"in {root}/fashion-mnist/ or in {root}/FashionMNIST/raw/; or add --download to fetch them")
    return (*(_checked(*_idx_split(folder, s), folder) for s in SPLITS), FASHION_MNIST_CLASSES)


def _fashion_folder(root: Path) -> Path | None:
    """The folder holding all four IDX files, in one of the accepted layouts; None if there is none."""
    for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
        if all(_idx_file(folder, stem) for stems in _FASHION_FILES.values() for stem in stems):
            return folder
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((path for path in (folder / stem, folder / f"{stem}.gz") if path.is_file()), None)


def _idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] and labels [N] of one Fashion-MNIST split."""
    paths = [_idx_file(folder, stem) for stem in _FASHION_FILES[split]]
    for stem, path in zip(_FASHION_FILES[split], paths):
        if path is None:
            raise FileNotFoundError(f"no {stem}.gz (or {stem}) in {folder}")
    images, labels = _idx(paths[0], 3), _idx(paths[1], 1)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels; download them again")
    return images, labels


def _idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of bytes, gzipped or not, as an array shaped as its header says."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt
        raise ValueError(f"cannot read {path} ({_one_line(e)}); download it again") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise ValueError(f"{path} is not an IDX file of {ndim}-d bytes (magic {raw[:4].hex()}, expected 000008{ndim:02x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != np.prod(shape):
        raise ValueError(f"{path} holds {len(raw) - header} bytes of data but its header says {shape}: truncated? download it again")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(shape)  # writable: torch wants that


def _cifar10_subset(root, download):
    if download:
        raise ValueError("cifar10-subset cannot be downloaded (it is not published anywhere): drop --download, "
                         "or use the dataset cifar10 with --download for the full CIFAR-10")
    root = _needs_root("cifar10-subset", root, "cifar10_subset.npz")
    candidates = (root / "cifar10_subset.npz", root / "cifar10-subset" / "cifar10_subset.npz")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no cifar10_subset.npz in {root} nor in {root}/cifar10-subset/; pass the folder holding it")
    arrays = _npz(path, ("train_images", "train_labels", "test_images", "test_labels"))
    return (*(_checked(arrays[f"{s}_images"], arrays[f"{s}_labels"], path) for s in SPLITS), CIFAR10_CLASSES)


def _npz(path: Path, keys) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in keys if key in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"cannot read {path} ({_one_line(e)}): not a complete .npz file") from e
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks the arrays {', '.join(missing)} (it should hold {', '.join(keys)})")
    return arrays


_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def _cifar10(root, download):
    root = _needs_root("cifar10", root, "cifar-10-batches-py/ (the official python version)", download)
    folder = root / "cifar-10-batches-py"
    if download:  # torchvision skips it when the files are there with the right md5 sums
        _downloading("CIFAR-10", root, lambda tv: tv.datasets.CIFAR10(root, train=True, download=True))
    missing = [name for name in _CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: pass the folder holding the extracted "
                                "cifar-10-batches-py/, or add --download to fetch CIFAR-10 there")
    tv = _torchvision()
    splits, classes = [], None
    for train in (True, False):
        try:
            cifar = tv.datasets.CIFAR10(root, train=train)
        except RuntimeError as e:  # torchvision's md5 checks failed
            raise ValueError(f"{folder} is corrupt or incomplete ({_one_line(e)}); add --download to fetch it again") from e
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read the CIFAR-10 batches in {folder} ({_one_line(e)}); add --download to fetch them again") from e
        splits.append(_checked(np.asarray(cifar.data), np.asarray(cifar.targets), folder))
        classes = list(cifar.classes)
    return splits[0], splits[1], classes


def _imagefolder(root, download, size: int, val_fraction: float, seed: int, augment: bool) -> Splits:
    """The image files listed (none read: FolderDataset streams them), the training folder split."""
    if download:
        raise ValueError("imagefolder cannot be downloaded: drop --download and pass --data-root PATH to your image folder")
    root = _needs_root("imagefolder", root, "train/<class>/<images> (and optionally test/ or val/), or <class>/<images>")
    if (root / "train").is_dir():
        train_dir = root / "train"
        test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    else:
        train_dir, test_dir = root, None
    samples, classes = _list_image_folder(train_dir)
    if len(classes) < 2:  # (every prediction would be right: accuracy says nothing, and nothing can be pruned by it)
        raise ValueError(f"{train_dir} holds one class folder ({classes[0]}); a classifier needs at least two: "
                         f"put each class's images in a folder of its own under {train_dir}")
    test = None
    if test_dir is not None:
        test_samples, test_classes = _list_image_folder(test_dir)
        if test_classes != classes:
            raise ValueError(f"the class folders of {train_dir} ({', '.join(classes)}) and {test_dir} "
                             f"({', '.join(test_classes)}) differ; give both the same class folders")
        test = FolderDataset(test_samples, size, classes=classes)
    val_idx, train_idx = _split("imagefolder", len(samples), val_fraction, seed)
    part = lambda indices: [samples[i] for i in indices]  # noqa: E731
    return Splits("imagefolder",
                  train=FolderDataset(part(train_idx), size, augment=augment, classes=classes, indices=train_idx),
                  val=FolderDataset(part(val_idx), size, classes=classes, indices=val_idx),
                  test=test, num_classes=len(classes), in_channels=3, image_size=size, classes=classes)


def _list_image_folder(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The (path, label) of every image file under folder/<class>/, and the sorted class names."""
    tv = _torchvision()
    try:
        found = tv.datasets.ImageFolder(folder, allow_empty=True)  # lists the files, reads none
    except FileNotFoundError as e:  # no class folder at all
        raise FileNotFoundError(f"no class folders in {folder}: expected {folder}/<class name>/<image files>") from e
    if not found.samples:
        raise ValueError(f"no images in the class folders of {folder} (looked for {' '.join(tv.datasets.folder.IMG_EXTENSIONS)})")
    return found.samples, list(found.classes)


_READERS = {"fashion-mnist-mini": _fashion_mnist_mini, "fashion-mnist": _fashion_mnist,
            "cifar10-subset": _cifar10_subset, "cifar10": _cifar10}


# ---- shared checks


def _needs_root(name: str, root, what: str, download: bool = False) -> Path:
    if root is None:
        raise ValueError(f"{name} needs --data-root PATH (root= in the API): the folder holding {what}")
    root = Path(root).expanduser()
    if not download and not root.is_dir():  # a download creates it
        hint = "; or add --download to fetch the data there" if name in ("fashion-mnist", "cifar10") else ""
        raise FileNotFoundError(f"the data root {root} is not a folder: pass the folder holding {what}{hint}")
    return root


def _checked(images: np.ndarray, labels: np.ndarray, source) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, H, W] or [N, H, W, C] and labels [N] as (uint8 [N, C, H, W], int64 [N])."""
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"{source} holds {images.dtype} images {images.shape} and labels {labels.shape}; "
                         "expected uint8 [N, H, W(, C)] with N labels")
    if len(labels) == 0:
        raise ValueError(f"{source} holds no images")
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return nchw, torch.from_numpy(labels.astype(np.int64))


def _torchvision():
    from .compat import import_torchvision

    return import_torchvision()


def _downloading(what: str, root: Path, fetch) -> None:
    """fetch(torchvision), with a failed download turned into one clear line."""
    try:
        fetch(_torchvision())
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError on bad md5 sums
        raise RuntimeError(f"could not download {what} into {root} ({_one_line(e)[:300]}); check the network, "
                      "or put the files there yourself") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- the older helpers: whole splits normalized with the published statistics


def _published(images_labels, mean, std) -> TensorDataset:
    return TensorDataset(*ImageDataset(*images_labels, mean, std).tensors)


def _check(root, folder: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = Path(root) / folder
    if not path.is_dir():
        raise FileNotFoundError(f"no {folder}/ folder under {root}; pass the folder that holds it (see the data README)")
    return path


def cifar10_subset(root, split: str = "train") -> TensorDataset:
    """The CIFAR-10 subset (5,085 train + 1,017 test images), from cifar10_subset.npz."""
    path = _check(root, "cifar10-subset", split) / "cifar10_subset.npz"
    arrays = _npz(path, (f"{split}_images", f"{split}_labels"))
    return _published(_checked(arrays[f"{split}_images"], arrays[f"{split}_labels"], path), CIFAR10_MEAN, CIFAR10_STD)


def fashion_mnist(root, split: str = "train") -> TensorDataset:
    """Fashion-MNIST (60,000 train + 10,000 test images, 28x28 grayscale), from the IDX files."""
    folder = _check(root, "fashion-mnist", split)
    return _published(_checked(*_idx_split(folder, split), folder), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
