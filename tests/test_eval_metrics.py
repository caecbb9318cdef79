"""eval.py's nll, fd_classifier and spectrum metrics end to end (the CLI against the package functions called
by hand), KID against a brute-force MMD², the feature-net weights file, and their bad input as one line."""

import json

import numpy as np
import pytest
import torch

from ddpm_curriculum.evaluation import open_images
from ddpm_curriculum.metrics import likelihood as lk
from ddpm_curriculum.metrics.feature_net import load_feature_net, save_feature_net, to_input
from ddpm_curriculum.metrics.fid import frechet_distance, kernel_inception_distance
from ddpm_curriculum.metrics.spectrum import compare_spectra, spectrum_stats
from ddpm_curriculum.sampling.folder import write_png
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import run_script as script


def brute_force_mmd2(x, y):
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_equals_brute_force_unbiased_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    kid, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=12)  # subsets = permutations of all
    assert kid == pytest.approx(brute_force_mmd2(x, y), rel=1e-12) and std < 1e-12
    near, _ = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)), 10, 200)
    assert abs(near) < 0.05 * kid  # unbiased: ≈ 0 for one distribution


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A feature net trained by the script on a 2-class 8×8 tree (dark vs bright noise)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 10)):
        for name, lo in (("dark", 0), ("bright", 128)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                write_png(root / split / name / f"{i:02d}.png", rng.integers(lo, lo + 128, (8, 8, 3), dtype=np.uint8))
    out = root / "fnet.pt"
    res = script("scripts/train_feature_net.py", "--data-root", str(root), "--out", str(out), "--max-epochs", "15",
                 "--width", "8", "--feature-dim", "16", "--batch-size", "16")
    assert res.returncode == 0, res.stderr
    return out, root, res.stdout


def test_feature_net_file_round_trips_and_records_its_accuracy(feature_net, tmp_path):
    out, _, stdout = feature_net
    model, meta = load_feature_net(out)
    assert meta["classes"] == ["bright", "dark"] and meta["image_shape_hwc"] == [8, 8, 3]
    assert meta["num_train"] == 48 and meta["num_test"] == 20 and meta["training"]["epochs"] == 15
    assert f"test accuracy {meta['test_accuracy']:.4f}" in stdout
    assert meta["test_accuracy"] >= 0.9  # the two classes differ in brightness only
    again = tmp_path / "again.pt"
    save_feature_net(again, model, meta)
    model2, meta2 = load_feature_net(again)
    assert meta2 == meta
    pairs = zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    state = torch.load(out, weights_only=True)  # the safe loader reads it
    assert json.loads(json.dumps(state["meta"])) == state["meta"]


def _features(model, source):
    with torch.no_grad():
        return model.features(to_input(source.load(range(len(source))))).double().numpy()


@pytest.mark.slow
def test_fd_classifier_matches_frechet_distance_on_hand_computed_features(setup, feature_net, tmp_path):  # noqa: F811
    out, _, _ = feature_net
    args = ["--metrics", "fd_classifier", "--feature-net", str(out), "--device", "cpu", "--no-progress"]
    res = script("eval.py", "--sample-folder", str(setup["samples"]), "--ref-folder", str(setup["ref"]), *args,
                 "--json", str(tmp_path / "r.json"), "--kid-subset-size", "30")
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    model, _ = load_feature_net(out)
    f1, f2 = _features(model, open_images(setup["samples"])), _features(model, open_images(setup["ref"]))
    expected = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert result["metrics"]["fd_classifier"] == pytest.approx(expected, rel=1e-5)
    assert result["metrics"]["kid_classifier"] == pytest.approx(kernel_inception_distance(f1, f2, 100, 30)[0],
                                                                rel=1e-4, abs=1e-7)
    assert "not FID" in res.stdout and result["settings"]["feature_net"]["feature_dim"] == 16
    same = script("eval.py", "--sample-folder", str(setup["ref"]), "--ref-folder", str(setup["ref"]), *args,
                  "--json", str(tmp_path / "s.json"))
    assert same.returncode == 0, same.stderr
    assert abs(json.loads((tmp_path / "s.json").read_text())["metrics"]["fd_classifier"]) < 1e-6


@pytest.mark.slow
def test_spectrum_cli_matches_the_package(setup, tmp_path):  # noqa: F811
    res = script("eval.py", "--sample-folder", str(setup["samples"]), "--ref-folder", str(setup["ref"]),
                 "--metrics", "spectrum", "--spectrum-bands", "3", "--json", str(tmp_path / "r.json"),
                 "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    got = json.loads((tmp_path / "r.json").read_text())["metrics"]
    want = compare_spectra(spectrum_stats(open_images(setup["samples"]), 3),
                           spectrum_stats(open_images(setup["ref"]), 3))
    np.testing.assert_allclose(got["spectrum_log10_ratio"], want["spectrum_log10_ratio"], rtol=1e-12)
    assert got["spectrum_high_error"] == pytest.approx(want["spectrum_high_error"], rel=1e-12)
    assert "spectrum log10 ratio per band" in res.stdout


@pytest.mark.slow
def test_nll_cli_matches_the_package_and_k_equal_t_is_exact(setup, tmp_path):  # noqa: F811
    net = load_network(setup["run"])
    T = net.diffusion.timesteps
    res = script("eval.py", "--metrics", "nll", "--checkpoint", str(setup["run"]), "--ref-folder", str(setup["ref"]),
                 "--nll-timesteps", "6", "--nll-samples", "20", "--json", str(tmp_path / "r.json"),
                 "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    want = lk.nll_bpd(net.diffusion, net.model, _First(open_images(setup["ref"]), 20), 6, batch_size=7)
    assert got["metrics"]["nll_bpd"] == pytest.approx(want.bpd, rel=1e-9)  # batch size does not matter
    assert got["metrics"]["nll_num_images"] == 20 and got["settings"]["nll"]["var_type"] == net.diffusion.var_type
    assert "NLL bound (bits/dim)" in res.stdout
    assert 0 < want.subsample_sem and want.sem > 0
    exact = lk.nll_bpd(net.diffusion, net.model, _First(open_images(setup["ref"]), 4), T)
    assert exact.subsample_sem == 0 and exact.timesteps == T


class _First:
    def __init__(self, source, n):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def load(self, idx):
        return self.source.load(idx)


@pytest.mark.parametrize("kind, fragment", [
    ("missing_net", "feature net not found"),
    ("not_a_net", "is not a feature-net file"),
    ("net_size", "but feature net"),
    ("no_checkpoint", "--metrics nll needs --checkpoint"),
    ("nll_k", "--nll-timesteps 1 must be in [2, 100]"),
    ("spectrum_stats", "need reference images, not statistics"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(setup, feature_net, tmp_path, kind, fragment):  # noqa: F811
    samples, ref = str(setup["samples"]), ["--ref-folder", str(setup["ref"])]
    args = {"missing_net": ["--metrics", "fd_classifier", "--feature-net", str(tmp_path / "none.pt")],
            "not_a_net": ["--metrics", "fd_classifier", "--feature-net", str(setup["weights_path"])],
            "net_size": ["--metrics", "fd_classifier", "--feature-net", str(feature_net[0])],
            "no_checkpoint": ["--metrics", "nll"],
            "nll_k": ["--metrics", "nll", "--checkpoint", str(setup["run"]), "--nll-timesteps", "1"],
            "spectrum_stats": ["--metrics", "spectrum"]}[kind]
    if kind == "net_size":  # 16×16 samples against 16×16 references, net trained on 8×8
        big = np.zeros((4, 16, 16, 3), np.uint8)
        np.savez(tmp_path / "big.npz", big)
        samples, ref = str(tmp_path / "big.npz"), ["--ref-folder", str(tmp_path / "big.npz")]
    if kind == "spectrum_stats":
        np.savez(tmp_path / "s.npz", mu=np.zeros(64), sigma=np.eye(64))
        ref = ["--ref-stats", str(tmp_path / "s.npz"), "--dims", "64"]
    res = script("eval.py", "--sample-folder", samples, *ref, *args, "--device", "cpu", "--no-progress")
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_grid_checkpoint_scores_the_opt_in_metrics_like_the_package(setup, feature_net):  # noqa: F811
    """eval.metrics in a grid: the numbers equal the package functions on the same images and checkpoint."""
    from ddpm_curriculum.evaluation.sources import DatasetImages
    from ddpm_curriculum.experiments.evaluate import evaluate_checkpoint
    from ddpm_curriculum.experiments.grid import GridEvalConfig
    from ddpm_curriculum.metrics.feature_net import fd_kid, local_features
    from ddpm_curriculum.training.reporting import eval_samples

    settings = GridEvalConfig(num_samples=40, sample_steps=3, batch_size=32, val_samples=8, seed=7, tki_t=[],
                              metrics=["nll", "spectrum", "fd_classifier"], nll_samples=6, nll_timesteps=5,
                              spectrum_bands=3, feature_net=str(feature_net[0]), ref_samples=50)
    got = evaluate_checkpoint(setup["run"], settings)
    net = setup["net"]
    cfg = net.config
    want = lk.nll_bpd(net.diffusion, net.model, DatasetImages(cfg, "test", 6), 5, seed=7)
    assert got["nll_bpd"] == pytest.approx(want.bpd, rel=1e-9) and got["nll_timesteps"] == 5
    images = eval_samples(net.diffusion, net.model, (3, 8, 8), 40, 3, 7, 32, "cpu")
    ref = DatasetImages(cfg, "train", 50)

    class Src:
        shape = tuple(images.shape[1:])

        def __len__(self):
            return len(images)

        def load(self, idx):
            return images[list(idx)].numpy()

    spec = compare_spectra(spectrum_stats(Src(), 3), spectrum_stats(ref, 3))
    assert got["spectrum_high_error"] == pytest.approx(spec["spectrum_high_error"], rel=1e-12)
    assert [got[f"spectrum_band{k}_log10_ratio"] for k in range(3)] == pytest.approx(spec["spectrum_log10_ratio"])
    model, _ = load_feature_net(feature_net[0])
    fd = fd_kid(*local_features(model, Src()), *local_features(model, ref))
    assert got["fd_classifier"] == pytest.approx(fd["fd_classifier"], rel=1e-9)


def test_eval_json_of_a_run_has_the_opt_in_metrics_and_bad_names_are_refused(tmp_path):
    from ddpm_curriculum.errors import UserError

    from .helpers import run, tiny_cfg

    run(tiny_cfg("train.steps=6", "eval.num_samples=8", "eval.metrics=[\"nll\",\"spectrum\"]",
                 "eval.nll_samples=3", "eval.nll_timesteps=4", "eval.spectrum_bands=3", "train.image_intv=0"),
        tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"]
    assert {"nll_bpd", "nll_bpd_sem", "spectrum_high_error", "minor_present"} <= metrics.keys()
    assert metrics["nll_num_images"] == 3 and metrics["nll_timesteps"] == 4
    with pytest.raises(UserError, match="unknown metric\\(s\\) \\['fid'\\]"):
        tiny_cfg("eval.metrics=[\"fid\"]")
    with pytest.raises(UserError, match="'eval.feature_net' is null"):
        tiny_cfg("eval.metrics=[\"fd_classifier\"]")


def test_real_image_floor_scores_held_out_images_as_samples(feature_net):
    """run_experiments.py --floor: the test split's images go through the same metric code as samples, against
    the same training reference."""
    from ddpm_curriculum.config import config_from_dict
    from ddpm_curriculum.evaluation.sources import DatasetImages
    from ddpm_curriculum.experiments.evaluate import real_image_floor
    from ddpm_curriculum.experiments.grid import GridEvalConfig
    from ddpm_curriculum.metrics.feature_net import fd_kid, local_features

    root = feature_net[1]
    cfg = config_from_dict({"dataset": {"name": "image_folder", "root": str(root), "split": "train",
                                        "labels": "subfolders", "image_size": 8}, "train": {"epochs": 1}})
    settings = GridEvalConfig(num_samples=6, metrics=["nll", "spectrum", "fd_classifier"], spectrum_bands=3,
                              feature_net=str(feature_net[0]), ref_samples=40)
    floor = real_image_floor(cfg, settings)
    held_out, ref = DatasetImages(cfg, "test", 6), DatasetImages(cfg, "train", 40)
    assert floor["num_images"] == 6 and "nll_bpd" not in floor
    want = compare_spectra(spectrum_stats(held_out, 3), spectrum_stats(ref, 3))
    assert floor["spectrum_high_error"] == pytest.approx(want["spectrum_high_error"], rel=1e-9)
    net, _ = load_feature_net(feature_net[0])
    (fs, fk), (rs, rk) = local_features(net, held_out), local_features(net, ref)
    assert floor["fd_classifier"] == pytest.approx(fd_kid(fs, fk, rs, rk)["fd_classifier"], rel=1e-6)
