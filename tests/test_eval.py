"""eval.py end to end (tiny model → generate → evaluate against a tiny fake reference, checked against the
pytorch-fid pipeline under identical random Inception weights), statistics files, oracle metrics, feature
extraction over 2 gloo processes, and every bad input as one line with exit code 2."""

import json
from unittest import mock

import numpy as np
import pytest
import pytorch_fid.fid_score as pfid_score
import pytorch_fid.inception as pfid_inception
import torch

from ddpm_curriculum.evaluation import EvalSettings, NpzImages, evaluate, extract_features
from ddpm_curriculum.evaluation.sources import DatasetImages
from ddpm_curriculum.metrics.oracle import twoscale_oracle_metrics
from ddpm_curriculum.metrics.prdc import prdc
from ddpm_curriculum.sampling import load_folder
from ddpm_curriculum.sampling.folder import write_png

from .helpers import EVAL_N as N, ddp_spawn, run_script as script, tiny_cfg


def pytorch_fid_pipeline(setup):
    """FID and the 64-d features of both folders computed by pytorch-fid with the same random weights
    (its calculate_fid_given_paths, with the activations kept)."""
    with mock.patch.object(pfid_inception, "load_state_dict_from_url", return_value=setup["weights"]):
        model = pfid_inception.InceptionV3([0]).eval()
    feats = [pfid_score.get_activations(sorted(str(p) for p in folder.glob("*.png")), model, 50, 64, "cpu", 0)
             for folder in (setup["samples"], setup["ref"])]
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]
    return pfid_score.calculate_frechet_distance(*stats[0], *stats[1]), feats


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # pytorch-fid's sqrtm call
def test_end_to_end_matches_pytorch_fid(setup, tmp_path):
    out = tmp_path / "result.json"
    res = script("eval.py", "--sample-folder", str(setup["samples"]), "--ref-folder", str(setup["ref"]),
                 "--dims", "64", "--inception-weights", str(setup["weights_path"]), "--json", str(out),
                 "--save-stats", str(tmp_path / "ref_stats.npz"), "--no-progress", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert "FID" in res.stdout and "precision (k=3)" in res.stdout and "64-d" in res.stdout
    assert result["samples"]["num_images"] == N and result["reference"]["num_images"] == N
    assert result["settings"]["dims"] == 64 and result["settings"]["pr_points"] == [N, N]
    fid, (fake, real) = pytorch_fid_pipeline(setup)
    m = result["metrics"]
    assert m["fid"] == pytest.approx(fid, rel=1e-3)
    expected = prdc(torch.from_numpy(real), torch.from_numpy(fake))
    for key in ("precision", "recall", "density", "coverage"):
        assert m[key] == pytest.approx(expected[key], abs=1.5 / N), key

    # the saved reference statistics (with features) reproduce every number. Both runs are eval.py at one
    # thread: the sample features are recomputed, and CPU convolutions differ at ~1e-7 across thread counts
    # (issue 14's audit saw FID 1.9224641352677296 at 2 threads vs 1.9224641622272336 at 1), so comparing
    # with an in-process run at torch's default threads would test the thread count, not the statistics file.
    res = script("eval.py", "--sample-folder", str(setup["samples"]), "--ref-stats", str(tmp_path / "ref_stats.npz"),
                 "--dims", "64", "--inception-weights", str(setup["weights_path"]), "--json",
                 str(tmp_path / "again.json"), "--no-progress", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["metrics"]["fid"] == m["fid"]
    assert all(again["metrics"][k] == m[k] for k in ("precision", "recall", "density", "coverage"))
    common = dict(samples=str(setup["samples"]), dims=64, inception_weights=str(setup["weights_path"]),
                  progress=False)
    # the same images read from the dataset (quantised like saved PNGs) give the same numbers as the folder in
    # this process, and are cached (the script ran on 1 thread: CPU convolutions differ at ~1e-7 across thread
    # counts, so the bit-level comparison is made within one process)
    cfg = tiny_cfg(f"dataset.num_samples={N}")
    folder = evaluate(EvalSettings(ref_folder=str(setup["ref"]), **common), "cpu")
    assert folder["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-5)
    direct = evaluate(EvalSettings(dataset_config=cfg, stats_cache=str(tmp_path / "cache"), **common), "cpu")
    assert direct["metrics"]["fid"] == pytest.approx(folder["metrics"]["fid"], rel=1e-12)
    assert direct["reference"]["cache"]
    assert direct["metrics"]["oracle"]["num_samples"] == N  # a twoscale reference adds the oracle metrics


@pytest.mark.slow
def test_oracle_metrics_for_a_twoscale_reference(setup, tmp_path):
    cfg = setup["net"].config
    result = evaluate(EvalSettings(samples=str(setup["samples"]), dataset_config=cfg, metrics=["oracle"],
                                   progress=False), "cpu")
    images = torch.from_numpy(load_folder(setup["samples"], N, (3, 8, 8))).permute(0, 3, 1, 2)
    expected = twoscale_oracle_metrics(images.double() / 127.5 - 1, DatasetImages(cfg).dataset)
    assert result["metrics"]["oracle"] == pytest.approx(expected)
    assert result["reference"]["source"] == "dataset twoscale (train split)"


def test_dataset_statistics_cache_is_keyed_and_reused(tmp_path):
    from ddpm_curriculum.evaluation import reference as refs

    cfg = tiny_cfg()
    source = DatasetImages(cfg)
    extract = lambda src, keep, desc: extract_features(src, _fake_model, 8, 16, "cpu", keep)  # noqa: E731
    first = refs.from_dataset(source, cfg, "train", None, extract, 10, 8, tmp_path, "w1")
    assert first.cache.is_file() and first.num_images == 64 and first.features.shape == (10, 8)

    def fail(*_):
        raise AssertionError("statistics recomputed despite the cache")

    cached = refs.from_dataset(source, cfg, "train", None, fail, 10, 8, tmp_path, "w1")
    np.testing.assert_array_equal(cached.sigma, first.sigma)
    assert torch.equal(cached.features, first.features) and cached.cache == first.cache
    keys = [refs.dataset_cache_path(tmp_path, cfg, *args) for args in
            [("train", None, 8, 10, "w1"), ("test", None, 8, 10, "w1"), ("train", 5, 8, 10, "w1"),
             ("train", None, 64, 10, "w1"), ("train", None, 8, 11, "w1"), ("train", None, 8, 10, "w2")]]
    keys.append(refs.dataset_cache_path(tmp_path, tiny_cfg("dataset.seed=1"), "train", None, 8, 10, "w1"))
    assert len(set(keys)) == len(keys)


def _fake_model(x, dims):
    """A cheap stand-in for Inception with the same call signature: a fixed projection of the pixels."""
    proj = torch.linspace(-1, 1, x[0].numel() * dims[0]).reshape(x[0].numel(), dims[0])
    return {dims[0]: x.flatten(1) @ proj}


def _extract_worker(rank, npz, out):
    feats = extract_features(NpzImages(npz), _fake_model, 8, batch_size=3, device="cpu", keep=11)
    mu, sigma = feats.stats.mean_cov()
    np.savez(f"{out}/rank{rank}.npz", mu=mu, sigma=sigma, kept=feats.kept.numpy(), n=feats.stats.n)


@pytest.mark.slow
def test_feature_extraction_over_two_gloo_processes_equals_one(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=images)
    ddp_spawn(_extract_worker, str(tmp_path / "x.npz"), str(tmp_path))
    one = extract_features(NpzImages(tmp_path / "x.npz"), _fake_model, 8, batch_size=5, device="cpu", keep=11)
    mu, sigma = one.stats.mean_cov()
    feats = _fake_model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, (8,))[8].double().numpy()
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as r:
            assert int(r["n"]) == 23
            np.testing.assert_allclose(r["mu"], mu, rtol=1e-12)
            np.testing.assert_allclose(r["sigma"], sigma, rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(r["kept"], one.kept.numpy())  # first 11 images, in index order


def _bad_folder(tmp_path, setup, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "empty":
        return folder
    for p in sorted(setup["samples"].glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    bad = folder / "000070.png"
    if kind == "unreadable":
        bad.write_bytes(b"not a png")
    else:
        write_png(bad, np.zeros((8, 9, 3), np.uint8))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind, fragment", [
    ("empty", "no images"),
    ("unreadable", "cannot read image {folder}/000070.png"),
    ("wrong_size", "image {folder}/000070.png is 9x8 with 3 channels but 000000.png is 8x8"),
    ("few_samples", "66 sample images give a singular covariance at 2048 dims"),
    ("ref_dims", "have 192 dims but --dims is 64"),
    ("no_weights", "FID Inception weights not found"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, kind, fragment):
    samples = setup["samples"]
    args = ["--ref-folder", str(setup["ref"]), "--dims", "64", "--inception-weights", str(setup["weights_path"])]
    if kind in ("empty", "unreadable", "wrong_size"):
        samples = _bad_folder(tmp_path, setup, kind)
    elif kind == "few_samples":
        args = ["--ref-folder", str(setup["ref"])]
    elif kind == "ref_dims":
        np.savez(tmp_path / "s192.npz", mu=np.zeros(192), sigma=np.eye(192))
        args = ["--ref-stats", str(tmp_path / "s192.npz"), "--dims", "64"]
    else:
        args = ["--ref-folder", str(setup["ref"]), "--dims", "64", "--no-download"]
    res = script("eval.py", "--sample-folder", str(samples), *args, "--device", "cpu", "--no-progress",
                 env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert res.returncode == 2, res.stderr
    assert fragment.format(folder=samples) in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
