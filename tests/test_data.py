"""The real datasets: shapes, labels, normalization, splits, augmentation, every loader, and clear errors."""

import gzip
import pickle
import random

import numpy as np
import pytest
import torch

from easier_kernels import data
from easier_kernels.compat import import_torchvision
from helpers import data_root


@pytest.fixture(scope="module")
def root():
    found = data_root()
    if found is None:
        pytest.skip("the real datasets are not here: set EASIER_KERNELS_DATA to the folder holding them")
    return found


def test_cifar10_subset(root):
    if not (root / "cifar10-subset").is_dir():
        pytest.skip("the CIFAR-10 subset is not here")
    train, test = data.cifar10_subset(root, "train"), data.cifar10_subset(root, "test")
    assert len(train) == 5085 and len(test) == 1017
    images, labels = train.tensors
    assert images.shape == (5085, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == set(range(10))
    assert images.mean((0, 2, 3)).abs().max() < 0.1 and (images.std((0, 2, 3)) - 1).abs().max() < 0.1


def test_fashion_mnist(root):
    if not (root / "fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not here")
    test = data.fashion_mnist(root, "test")
    images, labels = test.tensors
    assert images.shape == (10000, 1, 28, 28) and labels.bincount().tolist() == [1000] * 10
    assert abs(images.mean().item()) < 0.1


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no cifar10-subset/ folder under"):
        data.cifar10_subset(tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.fashion_mnist(tmp_path, "val")
    monkeypatch.delenv("EASIER_KERNELS_DATA", raising=False)
    assert data.find_root(tmp_path) is None
    (tmp_path / "fashion-mnist").mkdir()
    assert data.find_root(tmp_path / "elsewhere", tmp_path) == tmp_path


# ---- load(): the embedded subset, splits, normalization, augmentation, every dataset and its errors


def official_fashion(folder, prefix):
    """An official Fashion-MNIST split read as the data README shows, independently of data.py."""
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28).copy()
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        return images, np.frombuffer(f.read(), np.uint8, offset=8).copy()


def write_idx(path, array, gz=True):
    """An IDX file of uint8 with the header its shape says (0 images allowed)."""
    header = bytes((0, 0, 8, array.ndim)) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def small_fashion(folder, gz=True, train=120, test=30):
    """Four small IDX files in `folder`, from the embedded subset; returns its arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(data.MINI_PATH) as mini:
        arrays = {key: mini[key] for key in mini.files}
    suffix = ".gz" if gz else ""
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", arrays[f"{split}_images"][:n], gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[f"{split}_labels"][:n], gz)
    return arrays


@pytest.fixture(scope="module")
def mini():
    return data.load("fashion-mnist-mini")


def test_embedded_subset_file():
    with np.load(data.MINI_PATH) as arrays:
        assert sorted(arrays.files) == ["test_images", "test_labels", "train_images", "train_labels"]
        for split, n in (("train", 600), ("test", 100)):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            assert images.shape == (10 * n, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.uint8
            assert np.bincount(labels).tolist() == [n] * 10


def test_embedded_subset_is_the_first_images_of_each_class(root):
    if not (root / "fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not here")
    with np.load(data.MINI_PATH) as arrays:
        for split, prefix, n in (("train", "train", 600), ("test", "t10k", 100)):
            images, labels = official_fashion(root / "fashion-mnist", prefix)
            keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)])
            keep.sort()  # original order
            assert np.array_equal(arrays[f"{split}_images"], images[keep])
            assert np.array_equal(arrays[f"{split}_labels"], labels[keep])


def test_load_embedded(mini):
    assert (mini.name, mini.num_classes, mini.in_channels, mini.image_size) == ("fashion-mnist-mini", 10, 1, 28)
    assert mini.classes[0] == "T-shirt/top" and mini.classes[9] == "Ankle boot" and mini.train.classes == mini.classes
    assert (len(mini.train), len(mini.val), len(mini.test)) == (5400, 600, 1000)
    image, label = mini.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert mini.train.augment and not mini.val.augment and not mini.test.augment
    assert mini.test.images.dtype == torch.uint8 and mini.test.labels.bincount().tolist() == [100] * 10
    assert not data.load("fashion-mnist-mini", augment=False).train.augment


def test_split(mini):
    train, val = mini.train.indices, mini.val.indices
    assert (len(train), len(val)) == (5400, 600)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(6000))  # disjoint and covering
    expected_val = torch.randperm(6000, generator=torch.Generator().manual_seed(0))[:600]
    assert torch.equal(val, expected_val.sort().values)
    with np.load(data.MINI_PATH) as arrays:
        images, labels = torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]).long()
    assert torch.equal(mini.val.images[:, 0], images[val]) and torch.equal(mini.val.labels, labels[val])
    assert torch.equal(mini.train.images[:, 0], images[train]) and torch.equal(mini.train.labels, labels[train])
    again, other = data.load("fashion-mnist-mini", seed=0), data.load("fashion-mnist-mini", seed=1)
    assert torch.equal(again.val.indices, val) and torch.equal(again.train.images, mini.train.images)
    assert not torch.equal(other.val.indices, val)
    assert len(data.load("fashion-mnist-mini", val_fraction=0.25).val) == 1500


def test_normalization(mini):
    pixels = mini.train.images.double() / 255
    assert mini.train.mean == pytest.approx((pixels.mean().item(),), rel=1e-9)
    assert mini.train.std == pytest.approx((pixels.std(unbiased=False).item(),), rel=1e-9)
    assert mini.val.mean == mini.test.mean == mini.train.mean and mini.val.std == mini.test.std == mini.train.std
    images, labels = mini.train.tensors
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-4
    expected = (mini.test.images.float() / 255 - mini.train.mean[0]) / mini.train.std[0]
    assert torch.allclose(mini.test.tensors[0], expected, atol=1e-5)


def test_without_augmentation_samples_are_the_normalized_tensors(mini):
    for dataset in (data.load("fashion-mnist-mini", augment=False).train, mini.val, mini.test):
        images, labels = dataset.tensors
        samples = [dataset[i] for i in range(0, len(dataset), 37)]
        assert torch.equal(torch.stack([image for image, _ in samples]), images[::37])
        assert torch.equal(torch.stack([label for _, label in samples]), labels[::37])


def candidates(image):
    """The 2 * 81 flips and shifts of one uint8 image [C, H, W]: (flip, dy, dx) -> image, zero-padded by 4."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 8, w + 8, dtype=torch.uint8)
    padded[:, 4:4 + h, 4:4 + w] = image
    out = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out[False, dy, dx], out[True, dy, dx] = crop, torch.flip(crop, dims=[2])
    return out


def test_augmentation_is_a_flip_and_shift(mini):
    # random pixels make all 162 candidates distinct, so each sample tells which one it is
    images = torch.randint(0, 256, (6, 3, 12, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    dataset = data.ImageDataset(images, torch.arange(6), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), augment=True)
    options = [candidates(image) for image in images]
    seen = []
    torch.manual_seed(0)
    for step in range(900):
        i = step % len(dataset)
        sample, label = dataset[i]
        found = [key for key, candidate in options[i].items() if torch.equal(sample, dataset.normalize(candidate))]
        assert len(found) == 1 and label == i
        seen.append(found[0])
    flips = sum(flip for flip, _, _ in seen)
    assert 350 < flips < 550  # p = 0.5
    assert {dy for _, dy, _ in seen} == set(range(9)) and {dx for _, _, dx in seen} == set(range(9))
    # real images too: every sample is one of its candidates
    for i in range(0, len(mini.train), 271):
        sample = mini.train[i][0]
        assert any(torch.equal(sample, mini.train.normalize(c)) for c in candidates(mini.train.images[i]).values())


def test_augmentation_replays_from_torch_rng_alone(mini):
    def samples(seed, numpy_seed):
        torch.manual_seed(seed)
        np.random.seed(numpy_seed)  # numpy's and python's RNGs must play no part
        random.seed(numpy_seed)
        return torch.stack([mini.train[i][0] for i in range(40)])

    first = samples(3, 0)
    assert torch.equal(first, samples(3, 1))
    assert not torch.equal(first, samples(4, 0))
    torch.manual_seed(3)
    head = [mini.train[i][0] for i in range(15)]
    state = torch.get_rng_state()  # a resumed run restores this
    torch.manual_seed(99)
    torch.set_rng_state(state)
    assert torch.equal(torch.stack(head + [mini.train[i][0] for i in range(15, 40)]), first)


def test_fashion_mnist_layouts(root, tmp_path):
    folder = root / "fashion-mnist"
    if not folder.is_dir():
        pytest.skip("Fashion-MNIST is not here")
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    for file in folder.iterdir():
        (raw / file.name).symlink_to(file)
    test_images, test_labels = official_fashion(folder, "t10k")
    train_images, train_labels = official_fashion(folder, "train")
    for layout in (root, folder, tmp_path):
        splits = data.load("fashion-mnist", layout, seed=5)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
        assert (splits.in_channels, splits.image_size, splits.num_classes) == (1, 28, 10)
        assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test_images))
        assert torch.equal(splits.test.labels, torch.from_numpy(test_labels).long())
        val = splits.val.indices
        assert torch.equal(splits.val.images[:, 0], torch.from_numpy(train_images)[val])


def test_fashion_mnist_unzipped_and_download(tmp_path, monkeypatch):
    arrays = small_fashion(tmp_path / "plain", gz=False)
    splits = data.load("fashion-mnist", tmp_path / "plain")
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (120, 30)
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["test_images"][:30]))
    # download=True delegates to torchvision; here a stand-in writes what its download leaves
    fashion = import_torchvision().datasets.FashionMNIST
    monkeypatch.setattr(fashion, "download", lambda self: small_fashion(tmp_path / "dl" / "FashionMNIST" / "raw", gz=False))
    splits = data.load("fashion-mnist", tmp_path / "dl", download=True)
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (120, 30)

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/, got:\n<urlopen error>")

    monkeypatch.setattr(fashion, "download", offline)
    with pytest.raises(RuntimeError, match=r"could not download Fashion-MNIST into .*offline .*Error downloading") as error:
        data.load("fashion-mnist", tmp_path / "offline", download=True)
    assert "\n" not in str(error.value)  # torchvision's message spans lines; the CLI prints one


def write_cifar10(folder, train_images, train_labels, test_images, test_labels):
    """The official python-format layout: pickled dicts. They were Python 2 pickles whose str keys
    torchvision reads as str (encoding="latin1"), so the keys here are str, not bytes."""
    folder.mkdir(parents=True)

    def batch(name, images, labels):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # NHWC -> row-major CHW
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels.tolist(), "batch_label": name}, f, protocol=2)

    for i, (images, labels) in enumerate(zip(np.array_split(train_images, 5), np.array_split(train_labels, 5))):
        batch(f"data_batch_{i + 1}", images, labels)
    batch("test_batch", test_images, test_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": data.CIFAR10_CLASSES, "num_vis": 3072}, f, protocol=2)


@pytest.fixture
def cifar_arrays(root):
    if not (root / "cifar10-subset").is_dir():
        pytest.skip("the CIFAR-10 subset is not here")
    with np.load(root / "cifar10-subset" / "cifar10_subset.npz") as arrays:
        return arrays["train_images"][:200], arrays["train_labels"][:200], arrays["test_images"][:50], arrays["test_labels"][:50]


def test_cifar10_through_torchvision(tmp_path, monkeypatch, cifar_arrays):
    cifar = import_torchvision().datasets.cifar
    write_cifar10(tmp_path / "cifar-10-batches-py", *cifar_arrays)
    with pytest.raises(ValueError, match="cifar-10-batches-py is corrupt or incomplete.*--download"):
        data.load("cifar10", tmp_path)  # torchvision checks the real files' md5 sums, which these fail
    # so, only here, the md5 check (of the batches and of batches.meta) becomes an existence check
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: (tmp_path / path).is_file())
    splits = data.load("cifar10", tmp_path, val_fraction=0.2)
    train_images, train_labels, test_images, test_labels = cifar_arrays
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 40, 50)
    assert (splits.in_channels, splits.image_size, splits.num_classes, splits.classes) == (3, 32, 10, data.CIFAR10_CLASSES)
    assert torch.equal(splits.test.images, torch.from_numpy(test_images).permute(0, 3, 1, 2))
    assert torch.equal(splits.train.labels, torch.from_numpy(train_labels).long()[splits.train.indices])
    assert splits.train[0][0].shape == (3, 32, 32)
    # download=True goes through torchvision's download, which skips files already there
    monkeypatch.setattr(cifar.CIFAR10, "download", lambda self: None)
    assert len(data.load("cifar10", tmp_path, download=True).test) == 50

    def offline(self):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(cifar.CIFAR10, "download", offline)
    with pytest.raises(RuntimeError, match="could not download CIFAR-10 into .*name resolution.*check the network"):
        data.load("cifar10", tmp_path / "elsewhere", download=True)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py lacks data_batch_1, .*batches.meta.*--download"):
        (tmp_path / "empty" / "cifar-10-batches-py").mkdir(parents=True)
        data.load("cifar10", tmp_path / "empty")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read the CIFAR-10 batches in .*cifar-10-batches-py"):
        data.load("cifar10", tmp_path)


def write_png(path, size, color, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def make_image_folder(folder, classes=("cat", "dog", "frog")):
    """A few one-colour PNGs per class, of different sizes and modes; returns class -> RGB colour."""
    colours = {}
    for k, name in enumerate(classes):
        colour = (40 * k + 20, 200 - 50 * k, 90)
        colours[name] = colour
        write_png(folder / name / "a.png", (40, 30), colour)
        write_png(folder / name / "b.png", (20, 50), colour + (255,), mode="RGBA")
        write_png(folder / name / "c.png", (32, 32), colour)
    write_png(folder / "cat" / "grey.png", (64, 48), 77, mode="L")
    colours["grey"] = (77, 77, 77)
    return colours


def normalized(colour):
    """What an image of one RGB colour becomes in a FolderDataset: ImageNet-normalized float32 [3]."""
    return (torch.tensor(colour) / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)


def test_imagefolder(tmp_path):
    colours = make_image_folder(tmp_path / "flat")
    splits = data.load("imagefolder", tmp_path / "flat", val_fraction=0.3)
    assert splits.classes == ["cat", "dog", "frog"] and splits.test is None
    assert (len(splits.train), len(splits.val), splits.in_channels, splits.image_size, splits.num_classes) == (7, 3, 3, 224, 3)
    assert splits.train.augment and not splits.val.augment
    assert isinstance(splits.train, data.FolderDataset) and splits.train.classes == splits.classes
    splits = data.load("imagefolder", tmp_path / "flat", val_fraction=0.3, image_size=16)
    for dataset in (splits.train, splits.val):  # one-colour images stay one colour through any crop and resize
        for i, path in enumerate(dataset.paths):
            image, label = dataset[i]
            colour = colours["grey" if path.endswith("grey.png") else splits.classes[label]]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label.dtype == torch.int64
            assert torch.allclose(image, normalized(colour).view(3, 1, 1).expand(3, 16, 16), atol=1e-6)
    make_image_folder(tmp_path / "split" / "train")
    make_image_folder(tmp_path / "split" / "test")
    splits = data.load("imagefolder", tmp_path / "split", image_size=16)
    assert splits.image_size == 16 and splits.test[0][0].shape == (3, 16, 16) and not splits.test.augment
    assert splits.test.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    (tmp_path / "split" / "test").rename(tmp_path / "split" / "val")  # val/ is the test split when there is no test/
    assert len(data.load("imagefolder", tmp_path / "split").test) == 10


def test_imagefolder_split_is_seeded_and_the_same_as_the_in_memory_datasets(tmp_path):
    make_image_folder(tmp_path)
    first, again = (data.load("imagefolder", tmp_path, val_fraction=0.3, seed=5) for _ in range(2))
    assert first.val.paths.tolist() == again.val.paths.tolist()
    val_idx, train_idx = data._split("imagefolder", 10, 0.3, 5)
    assert torch.equal(first.val.indices, val_idx) and torch.equal(first.train.indices, train_idx)
    other = data.load("imagefolder", tmp_path, val_fraction=0.3, seed=6)
    assert sorted(first.val.paths.tolist() + first.train.paths.tolist()) == sorted(other.val.paths.tolist() +
                                                                                   other.train.paths.tolist())
    assert first.val.paths.tolist() != other.val.paths.tolist()


def test_imagefolder_is_read_from_disk_when_used(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test")
    splits = data.load("imagefolder", tmp_path, image_size=8)
    write_png(tmp_path / "test" / "cat" / "a.png", (40, 30), (1, 2, 3))  # changed after load(): what a read sees
    assert torch.allclose(splits.test[0][0], normalized((1, 2, 3)).view(3, 1, 1).expand(3, 8, 8), atol=1e-6)


def test_imagefolder_evaluation_resizes_the_shorter_side_to_size_over_0_875_then_crops_the_centre(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (24, 60, 3), dtype=np.uint8)  # H 24, W 60
    for split in ("train", "test"):
        for label in ("a", "b"):  # (one class is refused)
            (tmp_path / split / label).mkdir(parents=True)
            for name in ("x", "y"):
                Image.fromarray(pixels).save(tmp_path / split / label / f"{name}.png")
    # size 12: shorter side round(12 / 0.875) = 14, so 24x60 -> 14x35; the centre 12x12 starts at row 1, column 12
    resized = np.asarray(Image.fromarray(pixels).resize((35, 14), Image.BILINEAR))[1:13, 12:24]
    expected = (torch.from_numpy(resized.copy()).permute(2, 0, 1) / 255 - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    splits = data.load("imagefolder", tmp_path, image_size=12)
    assert torch.allclose(splits.test[0][0], expected, atol=1e-6)
    assert torch.allclose(data.load("imagefolder", tmp_path, image_size=12, augment=False).train[0][0], expected, atol=1e-6)


def test_imagefolder_training_is_a_random_resized_crop_and_flip_replayed_from_torch_rng(tmp_path):
    from PIL import Image

    tv = import_torchvision()
    T = tv.transforms
    pixels = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for name in ("x", "y"):
            Image.fromarray(pixels).save(tmp_path / label / f"{name}.png")
    train = data.load("imagefolder", tmp_path, image_size=16).train
    recipe = T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        expected = recipe(Image.fromarray(pixels))
        torch.manual_seed(seed)
        draws.append(train[0][0])
        assert torch.equal(draws[-1], expected)
    assert len({d.sum().item() for d in draws}) == 4  # other seeds, other crops


def test_imagefolder_in_data_loader_workers(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test")
    test = data.load("imagefolder", tmp_path, image_size=8).test
    batches = [torch.utils.data.DataLoader(test, batch_size=4, num_workers=workers) for workers in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 3
    for (images, labels), (images1, labels1) in zip(*batches):
        assert torch.equal(images, images1) and torch.equal(labels, labels1)
    import pickle

    assert pickle.loads(pickle.dumps(test))[0][0].shape == (3, 8, 8)  # the transform is rebuilt, not pickled


def test_imagefolder_errors(tmp_path):
    make_image_folder(tmp_path / "a" / "train")
    make_image_folder(tmp_path / "a" / "test", classes=("cat", "dog"))
    with pytest.raises(ValueError, match=r"class folders of .*train \(cat, dog, frog\) and .*test \(cat, dog\) differ"):
        data.load("imagefolder", tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*b: expected .*<class name>/<image files>"):
        data.load("imagefolder", tmp_path / "b")
    (tmp_path / "c" / "cat").mkdir(parents=True)
    (tmp_path / "c" / "cat" / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match=r"no images in the class folders of .*c \(looked for .*\.png"):
        data.load("imagefolder", tmp_path / "c")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    write_png(tmp_path / "one" / "cat" / "a.png", (4, 4), 0, mode="L")
    write_png(tmp_path / "one" / "cat" / "b.png", (4, 4), 0, mode="L")
    with pytest.raises(ValueError, match=r"one holds one class folder \(cat\); a classifier needs at least two: put "
                                         r"each class's images in a folder of its own"):
        data.load("imagefolder", tmp_path / "one")  # (every answer would be right: 100% accuracy that says nothing)
    (tmp_path / "one" / "cat" / "b.png").unlink()
    (tmp_path / "one" / "dog").mkdir()
    with pytest.raises(ValueError, match="imagefolder: the training set holds 1 image"):
        data.load("imagefolder", tmp_path / "one")
    with pytest.raises(ValueError, match="imagefolder cannot be downloaded"):
        data.load("imagefolder", tmp_path / "a", download=True)


def test_an_unreadable_image_is_found_when_read_and_named_in_one_line(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test")
    (tmp_path / "test" / "dog" / "broken.png").write_bytes(b"not a png at all")
    whole = (tmp_path / "test" / "frog" / "a.png").read_bytes()
    (tmp_path / "test" / "frog" / "a.png").write_bytes(whole[:len(whole) // 2])
    test = data.load("imagefolder", tmp_path, image_size=8).test  # the files are listed, not read
    for name in ("dog/broken.png", "frog/a.png"):
        i = [path.endswith(name) for path in test.paths].index(True)
        with pytest.raises(data.UnreadableImage, match=f"cannot read the image .*{name} .*remove or replace it") as caught:
            test[i]
        assert "\n" not in str(caught.value)
    with pytest.raises(data.UnreadableImage) as caught:  # a worker's, re-raised with its traceback in the message
        list(torch.utils.data.DataLoader(test, batch_size=4, num_workers=1))
    assert "DataLoader worker" in caught.value.args[0]
    assert str(caught.value).startswith("cannot read the image ") and str(caught.value).endswith("remove or replace it")


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of: fashion-mnist-mini, fashion-mnist, "
                                         "cifar10-subset, cifar10, imagefolder"):
        data.load("mnist")
    for fraction in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
            data.load("fashion-mnist-mini", val_fraction=fraction)
    with pytest.raises(ValueError, match="fashion-mnist-mini images are 28x28; image_size=32 applies to imagefolder only"):
        data.load("fashion-mnist-mini", image_size=32)
    assert data.load("fashion-mnist-mini", image_size=28).image_size == 28
    with pytest.raises(ValueError, match="image_size must be a positive integer, not 0"):
        data.load("imagefolder", tmp_path, image_size=0)
    for name, what in (("fashion-mnist", "the four Fashion-MNIST"), ("cifar10-subset", "cifar10_subset.npz"),
                       ("cifar10", "cifar-10-batches-py/"), ("imagefolder", "train/<class>/<images>")):
        with pytest.raises(ValueError, match=f"{name} needs --data-root PATH \\(root= in the API\\): the folder holding {what}"):
            data.load(name)
        with pytest.raises(FileNotFoundError, match=f"the data root {tmp_path / 'missing'} is not a folder"):
            data.load(name, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="or add --download"):
        data.load("fashion-mnist", tmp_path / "missing")
    with pytest.raises(ValueError, match=r"cifar10-subset cannot be downloaded \(it is not published anywhere\)"):
        data.load("cifar10-subset", tmp_path, download=True)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no Fashion-MNIST files in .*: expected train-images-idx3-ubyte, .*"
                                                r"FashionMNIST/raw/; or add --download"):
        data.load("fashion-mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="no cifar10_subset.npz in .* nor in .*cifar10-subset/"):
        data.load("cifar10-subset", tmp_path)

    def fashion_error(error, match, break_it):
        folder = tmp_path / f"fashion{len(list(tmp_path.iterdir()))}"
        small_fashion(folder)
        break_it(folder / "train-images-idx3-ubyte.gz")
        with pytest.raises(error, match=match) as raised:
            data.load("fashion-mnist", folder)
        assert "\n" not in str(raised.value)

    fashion_error(ValueError, r"cannot read .*train-images-idx3-ubyte\.gz \(Not a gzipped file",
                  lambda p: p.write_bytes(b"plain bytes, no gzip"))
    fashion_error(ValueError, r"cannot read .*train-images-idx3-ubyte\.gz \(Compressed file ended",
                  lambda p: p.write_bytes(p.read_bytes()[:-40]))
    fashion_error(ValueError, r"train-images-idx3-ubyte\.gz is not an IDX file of 3-d bytes \(magic 00000801",
                  lambda p: write_idx(p, np.zeros(120, np.uint8)))
    fashion_error(ValueError, r"train-images-idx3-ubyte\.gz holds 1000 bytes of data but its header says \(120, 28, 28\)",
                  lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:1016])))
    fashion_error(ValueError, r"train-images-idx3-ubyte\.gz holds 100 images but .*train-labels-idx1-ubyte\.gz 120 labels",
                  lambda p: write_idx(p, np.zeros((100, 28, 28), np.uint8)))
    fashion_error(ValueError, r"holds no images", lambda p: (write_idx(p, np.zeros((0, 28, 28), np.uint8)),
                                                            write_idx(p.with_name("train-labels-idx1-ubyte.gz"), np.zeros(0, np.uint8))))
    folder = tmp_path / "one"
    small_fashion(folder, train=1)
    with pytest.raises(ValueError, match=r"fashion-mnist: the training set holds 1 image\(s\); a train/val split needs at least 2"):
        data.load("fashion-mnist", folder)
    folder = tmp_path / "labels"
    small_fashion(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(30, 10, np.uint8))
    with pytest.raises(ValueError, match=r"fashion-mnist: test labels outside 0\.\.9"):
        data.load("fashion-mnist", folder)

    npz = tmp_path / "npz" / "cifar10_subset.npz"
    npz.parent.mkdir()
    np.savez(npz, train_images=np.zeros((4, 32, 32, 3), np.uint8), train_labels=np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"cifar10_subset\.npz lacks the arrays test_images, test_labels"):
        data.load("cifar10-subset", npz.parent)
    npz.write_bytes(npz.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cannot read .*cifar10_subset\.npz \(.*\): not a complete \.npz file"):
        data.load("cifar10-subset", npz.parent)
    npz.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read .*cifar10_subset\.npz"):
        data.load("cifar10-subset", npz.parent)
    np.savez(npz, train_images=np.zeros((4, 32, 32, 3), np.float32), train_labels=np.zeros(4, np.uint8),
             test_images=np.zeros((2, 32, 32, 3), np.uint8), test_labels=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match=r"cifar10_subset\.npz holds float32 images \(4, 32, 32, 3\) .*expected uint8"):
        data.load("cifar10-subset", npz.parent)


def test_cifar10_subset_through_load(root):
    if not (root / "cifar10-subset").is_dir():
        pytest.skip("the CIFAR-10 subset is not here")
    for layout in (root, root / "cifar10-subset"):
        splits = data.load("cifar10-subset", layout)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (4577, 508, 1017)
        assert (splits.in_channels, splits.image_size, splits.classes) == (3, 32, data.CIFAR10_CLASSES)
    images = splits.train.tensors[0]
    assert images.mean((0, 2, 3)).abs().max() < 1e-4 and (images.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_embedded_subset_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "MINI_PATH", tmp_path / "fashion_mnist_mini.npz")
    with pytest.raises(FileNotFoundError, match="the embedded subset .* is missing: reinstall easier-kernels"):
        data.load("fashion-mnist-mini")
