"""Datasets: the twoscale construction, determinism, and tiny fake CIFAR-10 / CelebA / image folders
in their real on-disk formats."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ddpm_curriculum.data import build_dataset, dataset_image_shape
from ddpm_curriculum.data.twoscale import TwoScaleDataset
from ddpm_curriculum.errors import UserError

from .helpers import make_fake_celeba, run, tiny_cfg


@pytest.fixture(scope="module")
def ts():
    return TwoScaleDataset()


def test_twoscale_prototypes_orthogonal_and_unit_rms(ts):
    protos = torch.cat([ts.prototypes_major.flatten(1), ts.prototypes_minor.flatten(2).flatten(0, 1)]).double()
    d = protos.shape[1]
    assert protos.shape == (4 + 16, 16 * 16 * 3)
    torch.testing.assert_close(protos @ protos.T, d * torch.eye(len(protos), dtype=torch.double), atol=1e-3, rtol=0)
    torch.testing.assert_close((protos ** 2).mean(1), torch.ones(len(protos), dtype=torch.double), atol=1e-5, rtol=0)


def test_twoscale_major_is_smooth_and_minor_is_fine(ts):
    def roughness(p):  # mean squared difference of neighbouring pixels, relative to the mean square
        dx, dy = p.diff(dim=-1), p.diff(dim=-2)
        return ((dx ** 2).mean() + (dy ** 2).mean()) / (p ** 2).mean()

    major = max(roughness(p) for p in ts.prototypes_major)
    minor = min(roughness(p) for p in ts.prototypes_minor.flatten(0, 1))
    assert major < 0.2 and minor > 1.5, (major, minor)


def test_twoscale_samples_are_a_function_of_seed_and_index():
    a, b = TwoScaleDataset(num_samples=100), TwoScaleDataset(num_samples=5000)
    for i in (0, 7, 99):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[3][0], TwoScaleDataset(num_samples=100, seed=1)[3][0])
    serial = torch.cat([x for x, _ in DataLoader(a, batch_size=10, num_workers=0)])
    parallel = torch.cat([x for x, _ in DataLoader(a, batch_size=10, num_workers=2)])
    assert torch.equal(serial, parallel)


def test_twoscale_test_split_continues_the_stream_with_the_same_prototypes():
    train, test = TwoScaleDataset(num_samples=100), TwoScaleDataset(num_samples=100, split="test")
    longer = TwoScaleDataset(num_samples=150)
    assert torch.equal(train.prototypes_minor, test.prototypes_minor)
    for i in (0, 49):
        assert torch.equal(test[i][0], longer[100 + i][0])
    assert not any(torch.equal(test[0][0], train[j][0]) for j in range(100))


def test_twoscale_sample_statistics_match_the_model():
    ds = TwoScaleDataset(num_samples=4000, image_size=8, k1=2, k2=2)
    xs, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    xs, labels = torch.stack(xs), torch.tensor(labels)
    counts = torch.bincount(labels, minlength=4).double() / len(labels)
    assert (counts - 0.25).abs().max() < 0.03  # k, j uniform
    k, j = 1, 0
    mean = xs[labels == k * 2 + j].mean(0)
    expected = ds.alpha1 * ds.prototypes_major[k] + ds.alpha2 * ds.prototypes_minor[k, j]
    n = int((labels == k * 2 + j).sum())
    assert (mean - expected).abs().max() < 5 * ds.sigma0 / n ** 0.5
    resid = xs[labels == k * 2 + j] - expected
    assert abs(resid.std().item() - ds.sigma0) < 0.002


@pytest.mark.parametrize("kwargs, fragment", [
    ({"k1": 1000}, "lower dataset.k1"), ({"k2": 1000}, "lower dataset.k2"), ({"num_samples": 0}, "positive"),
    ({"image_size": 2}, "at least 4"),
])
def test_twoscale_bad_arguments(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        TwoScaleDataset(**kwargs)


# ----------------------------------------------------------------------------- CIFAR-10


def make_fake_cifar(folder, n_per_batch=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n_per_batch)), b"batch_label": name.encode()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10}, f)
    with open(folder / "data_batch_1", "rb") as f:
        return pickle.load(f, encoding="bytes")[b"data"]


def test_cifar10_reads_the_pickle_batches(tmp_path):
    first = make_fake_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = build_dataset("cifar10", root=str(root))
        assert len(ds) == 15 and ds.image_shape == (3, 32, 32)
        x, label = ds[1]
        assert x.shape == (3, 32, 32) and label == 1 and x.min() >= -1 and x.max() <= 1
        expected = torch.from_numpy(first[1].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
        assert torch.equal(x, expected)
    assert len(build_dataset("cifar10", root=str(tmp_path), split="test")) == 3


def test_cifar10_missing_or_malformed_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(UserError, match="CIFAR10_PATH") as err:
        build_dataset("cifar10")
    assert "\n" not in str(err.value)
    folder = tmp_path / "bad" / "cifar-10-batches-py"
    make_fake_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 is malformed"):
        build_dataset("cifar10", root=str(folder))


def test_dataset_roots_from_env_and_dotenv(tmp_path, monkeypatch):
    make_fake_cifar(tmp_path / "data" / "cifar-10-batches-py")
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    assert len(build_dataset("cifar10")) == 15
    monkeypatch.delenv("DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"CIFAR10_PATH={tmp_path / 'data' / 'cifar-10-batches-py'}\n")
    try:
        assert len(build_dataset("cifar10")) == 15
    finally:
        import os
        os.environ.pop("CIFAR10_PATH", None)


# ------------------------------------------------------------------------------- CelebA


@pytest.mark.parametrize("name, size", [("celeba32", 32), ("celeba64", 64)])
def test_celeba_crop_and_size(tmp_path, name, size):
    make_fake_celeba(tmp_path)
    ds = build_dataset(name, root=str(tmp_path))
    assert len(ds) == 2 and ds.image_shape == (3, size, size)
    x, _ = ds[0]
    assert x.shape == (3, size, size)
    # only the crop region survives: no red inside (JPEG chroma bleeds into the outermost pixels only)
    inner = x[:, 1:-1, 1:-1]
    assert inner[0].max() < -0.8 and inner[2].min() > 0.8
    assert len(build_dataset("celeba", image_size=size, root=str(tmp_path), split="test")) == 1
    assert len(build_dataset("celeba", image_size=size, root=str(tmp_path / "img_align_celeba"))) == 2


def test_celeba_missing_names_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv("CELEBA_PATH", raising=False)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(UserError, match="CelebA not found.*CELEBA_PATH"):
        build_dataset("celeba32", root=str(tmp_path))


# ------------------------------------------------------------------------- image folder


def test_image_folder_recursive_odd_sizes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (50, 30), (10, 20, 30)).save(tmp_path / "a" / "x.png")
    Image.new("L", (17, 41), 200).save(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = build_dataset("image_folder", root=str(tmp_path), image_size=16)
    assert len(ds) == 2
    for i in range(2):
        x, label = ds[i]
        assert x.shape == (3, 16, 16) and label == -1
    i = [f.name for f in ds.files].index("x.png")
    torch.testing.assert_close(ds[i][0][:, 8, 8], torch.tensor([10, 20, 30]) / 127.5 - 1, atol=0.02, rtol=0)
    torch.testing.assert_close(ds[1 - i][0], torch.full((3, 16, 16), 200 / 127.5 - 1), atol=0.02, rtol=0)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no images"):
        build_dataset("image_folder", root=str(tmp_path), image_size=16)
    with pytest.raises(UserError, match="needs dataset.image_size"):
        build_dataset("image_folder", root=str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = build_dataset("image_folder", root=str(tmp_path), image_size=16)
    with pytest.raises(UserError, match="broken.png"):
        ds[0]


def test_shapes_without_touching_the_disk():
    assert dataset_image_shape("twoscale") == (3, 16, 16)
    assert dataset_image_shape("twoscale", image_size=8, channels=1) == (1, 8, 8)
    assert dataset_image_shape("cifar10") == (3, 32, 32)
    assert dataset_image_shape("celeba32") == (3, 32, 32)
    assert dataset_image_shape("celeba") == (3, 64, 64)
    with pytest.raises(UserError, match="needs dataset.image_size"):
        dataset_image_shape("image_folder")
    with pytest.raises(UserError, match="32x32"):
        dataset_image_shape("celeba32", image_size=64)


def test_held_out_images_of_a_train_test_tree_are_its_test_half_and_subsets_cover_every_class(tmp_path):
    """Evaluation asks for split "test": a tree with dataset.split = "train" must give its test/ images (not the
    training ones), and a subset of a class-sorted folder must not be the first class only."""
    from ddpm_curriculum.config import config_from_dict
    from ddpm_curriculum.data import evenly_spaced
    from ddpm_curriculum.evaluation.sources import DatasetImages
    from ddpm_curriculum.training.builders import make_dataset

    for split, n, base in (("train", 4, 0), ("test", 2, 128)):
        for k, name in enumerate(("a", "b", "c")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):  # one gray level per (split, class)
                Image.fromarray(np.full((8, 8, 3), base + 40 * k, np.uint8)).save(tmp_path / split / name / f"{i}.png")
    cfg = config_from_dict({"dataset": {"name": "image_folder", "root": str(tmp_path), "split": "train",
                                        "labels": "subfolders", "image_size": 8}, "train": {"epochs": 1}})
    assert len(make_dataset(cfg, "train")) == 12 and len(make_dataset(cfg, "test")) == 6

    def levels(src):
        return sorted(int(v) for v in src.load(range(len(src)))[:, 0, 0, 0])

    assert levels(DatasetImages(cfg, "test")) == [128, 128, 168, 168, 208, 208]
    assert levels(DatasetImages(cfg, "train", 3)) == [0, 40, 80]  # one per class, not three of class a
    assert evenly_spaced(12, 3) == [0, 4, 8] and evenly_spaced(5, 9) == [0, 1, 2, 3, 4]


class Stripes(torch.utils.data.Dataset):
    """The docs/architecture.md example of adding a dataset: vertical stripes of a random phase, unlabelled."""

    default_size, fixed_size, natural_images = 8, False, False

    def __init__(self, size: int, n: int = 32):
        self.size, self.n, self.image_shape = size, n, (1, size, size)

    @staticmethod
    def channels_of(d) -> int:
        return 1

    @classmethod
    def from_config(cls, d, size, split, use_cache):
        return cls(size, n=d.num_samples)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.arange(self.size, dtype=torch.float32).add(i).remainder(2).mul(2).sub(1)
        return x.expand(1, self.size, self.size).clone(), -1


def test_adding_a_dataset_is_one_registry_entry(monkeypatch, tmp_path):
    """A class with from_config/default_size/channels_of/natural_images in DATASETS is all a dataset needs: the
    config accepts its name, the shape and flip default come from it, and a run trains on it."""
    from ddpm_curriculum.data import DATASETS
    from ddpm_curriculum.training import builders

    monkeypatch.setitem(DATASETS, "stripes", Stripes)
    cfg = tiny_cfg("dataset.name=stripes", "dataset.image_size=null", "dataset.num_samples=16",
                   "model.in_channels=1", "train.steps=6", "train.num_samples=0", "eval.num_samples=0")
    assert builders.image_shape(cfg) == (1, 8, 8) and not builders.use_random_flip(cfg)
    trainer = run(cfg, tmp_path)
    assert trainer.step == 6 and len(trainer.dataset) == 16
    with pytest.raises(UserError, match="'dataset.name' = 'strips' is not one of"):
        tiny_cfg("dataset.name=strips")
