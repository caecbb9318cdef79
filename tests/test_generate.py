"""generate.py: per-image noise, images independent of batch size / order / world size, resume, outputs,
and the script's errors."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.sampling import (PerImageNoise, SamplerSpec, generate_to_folder, load_folder, sample_batch,
                                      sample_name, shard)
from ddpm_curriculum.sampling import noise as noise_mod
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import run_script as script

SHAPE = (3, 8, 8)
SAMPLERS = {
    "ancestral": SamplerSpec(),
    "ddim": SamplerSpec(use_ddim=True, steps=10),
    "ddim-eta1-quadratic-tmax": SamplerSpec(use_ddim=True, steps=7, eta=1.0, skip_type="quadratic", t_max=60),
}


def test_uint8_conversions_invert_each_other():
    from ddpm_curriculum.sampling import from_uint8, to_uint8

    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3)
    assert torch.equal(to_uint8(from_uint8(every)), every)  # every level survives the round trip
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # beyond [−1, 1] too
    back = from_uint8(to_uint8(x), torch.float64)
    assert back.shape == x.shape and back.min() == -1 and back.max() == 1
    assert (back - x.double().clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-12  # half a level of 2/255


def test_per_image_noise_depends_only_on_seed_and_index(monkeypatch):
    monkeypatch.setattr(noise_mod, "CHUNK_VALUES", 2 * 3 * 8 * 8)  # chunks of 2 steps: cross boundaries
    def draws(indices, n=5):
        noise = PerImageNoise(7, indices, SHAPE, "cpu", num_draws=n)
        return [noise.initial()] + [noise.next() for _ in range(n)]

    alone = {i: draws([i]) for i in (0, 3, 4)}
    batch = draws([4, 0, 3])
    for row, i in enumerate([4, 0, 3]):
        for step, (a, b) in enumerate(zip(alone[i], batch, strict=True)):
            assert torch.equal(a[0], b[row]), f"image {i}, draw {step}"
    assert not torch.equal(alone[0][0], alone[3][0])
    assert not torch.equal(draws([0])[0], PerImageNoise(8, [0], SHAPE, "cpu").initial())  # seed matters
    # the streams are standard normal
    many = PerImageNoise(0, range(400), SHAPE, "cpu").initial()
    assert abs(many.mean().item()) < 0.02 and abs(many.std().item() - 1) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_images_do_not_depend_on_batch_composition(tiny_run, name):
    net = load_network(tiny_run)
    spec = SAMPLERS[name]
    if spec.name == "ancestral":  # 30 of the 100 steps: the same per-step noise draws, a third of the time
        spec = dataclasses.replace(spec, t_max=29)
    sample = lambda idx: sample_batch(net.diffusion, net.model, spec, idx, 3, SHAPE, "cpu")  # noqa: E731
    full = sample(list(range(6)))
    # another order, one thread: bit-identical (same batch size, same kernels). With more threads oneDNN splits
    # the batch between them by position, so where an image sits can change the last bits (measured: at most
    # 4.8e-7 at 2 threads, torch 2.14.1), like another batch size does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(sample([5, 4, 3, 2, 1, 0]).flip(0), sample(list(range(6))))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(sample([5, 4, 3, 2, 1, 0]).flip(0), full, atol=1e-5, rtol=0)
    # other batch sizes: batched convolutions may round differently in the last bit, nothing more
    split = torch.cat([sample([0]), sample([1, 2]), sample([3, 4, 5])])
    torch.testing.assert_close(split, full, atol=1e-5, rtol=0)
    assert full.std() > 0.1  # real images, not a constant


def test_shard_partitions_indices():
    idx = list(range(11))
    parts = [shard(idx, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == idx and [len(p) for p in parts] == [4, 4, 3]


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


@pytest.mark.slow
def test_generate_resume_repairs_missing_and_damaged_files(tiny_run, tmp_path):
    net = load_network(tiny_run)
    spec = SAMPLERS["ddim"]
    first = generate_to_folder(net, spec, tmp_path / "a", 7, batch_size=3, seed=1, device="cpu", npz="",
                               grid=4, progress=False)
    assert first.generated == 7 and first.images_per_sec > 0
    ref = _files(tmp_path / "a")
    assert sorted(ref) == [sample_name(i) for i in range(7)]
    # the npz holds the PNGs' pixels, uint8 NHWC under arr_0; the grid lives outside the top level
    with np.load(first.npz) as f:
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (7, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_0"], load_folder(tmp_path / "a", 7, SHAPE))
    assert first.npz.name == "samples_7x8x8x3.npz" and first.grid == tmp_path / "a" / "preview" / "grid.png"

    folder = tmp_path / "a"
    (folder / sample_name(1)).unlink()  # missing
    (folder / sample_name(3)).write_bytes(ref[sample_name(3)][:40])  # truncated
    (folder / sample_name(5)).write_bytes(b"garbage")  # unreadable
    (folder / f".{sample_name(6)}.tmp123").write_bytes(b"partial")  # left by a killed run
    kept = {i: (folder / sample_name(i)).stat().st_mtime_ns for i in (0, 2, 4, 6)}
    again = generate_to_folder(net, spec, folder, 7, batch_size=2, seed=1, device="cpu", grid=0, progress=False)
    assert again.generated == 3
    assert all((folder / sample_name(i)).stat().st_mtime_ns == t for i, t in kept.items())  # untouched
    assert not list(folder.glob(".*.tmp*"))
    repaired = load_folder(folder, 7, SHAPE)
    original = np.load(first.npz)["arr_0"]
    assert np.abs(repaired.astype(int) - original.astype(int)).max() <= 1  # batch 2 vs 3: round-off only
    np.testing.assert_array_equal(repaired[[0, 2, 4, 6]], original[[0, 2, 4, 6]])


@pytest.mark.slow
def test_folder_from_other_settings_is_refused(tiny_run, tmp_path):
    net = load_network(tiny_run)
    generate_to_folder(net, SAMPLERS["ddim"], tmp_path / "a", 2, 2, seed=1, device="cpu", grid=0, progress=False)
    with pytest.raises(UserError, match="other settings \\(seed differ"):
        generate_to_folder(net, SAMPLERS["ddim"], tmp_path / "a", 2, 2, seed=2, device="cpu", progress=False)
    with pytest.raises(UserError, match="sampler differ"):
        generate_to_folder(net, SAMPLERS["ancestral"], tmp_path / "a", 2, 2, seed=1, device="cpu", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cat.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not written by generate.py"):
        generate_to_folder(net, SAMPLERS["ddim"], tmp_path / "b", 2, 2, seed=1, device="cpu", progress=False)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_images(tiny_run, tmp_path):
    common = ["--chkpt-path", str(tiny_run), "--use-ddim", "--ddim-steps", "5", "--eta", "0.5",
              "--num-samples", "9", "--seed", "4", "--device", "cpu", "--no-progress", "--grid", "0"]
    two = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "generate.py", *common,
                 "--batch-size", "2", "--save-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("images/s") == 1 and "generated 9 in" in two.stdout  # rank 0 reports, once
    one = script("generate.py", *common, "--batch-size", "2", "--save-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # same batch size: byte-identical PNGs
    manifest = json.loads((tmp_path / "two" / "generate.json").read_text())
    assert manifest["seed"] == 4 and manifest["sampler"]["eta"] == 0.5 and manifest["weights"] == "ema"
    # both ranks' digests reach the manifest, and they are the digests of the files
    assert manifest["sha256"] == {n: hashlib.sha256(b).hexdigest() for n, b in _files(tmp_path / "two").items()}
    assert not list((tmp_path / "two").glob("*.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--chkpt-path", "missing_run"], "checkpoint not found"),
    (["--t-max", "100"], "--t-max 100 is outside [0, 99]"),
    (["--use-ddim", "--ddim-steps", "500"], "DDIM steps = 500 must be in [1, 100]"),
    (["--dataset", "cifar10"], "trained on 'twoscale'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, args, fragment):
    base = ["--chkpt-path", str(tiny_run), "--num-samples", "2", "--save-dir", str(tmp_path / "x"), "--device",
            "cpu"]
    res = script("generate.py", *base, *args)
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "x").glob("*.png")) if (tmp_path / "x").exists() else True
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_noise_fn_replaces_the_generator_draws_exactly():
    """Feeding the loops the same normal draws through ``noise_fn`` reproduces their own generator path (the
    ancestral loop skips the unused draw at t = 0, which comes last)."""
    from ddpm_curriculum.diffusion import GaussianDiffusion, ddim_sample, make_betas

    diffusion = GaussianDiffusion(make_betas("linear", 50, 1e-4, 0.02), var_type="fixed-large")
    model = lambda x, t: 0.3 * x + 1e-3 * t.view(-1, 1, 1, 1)  # noqa: E731
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    for run_loop in (lambda **kw: diffusion.p_sample_loop(model, x_T, **kw),
                     lambda **kw: ddim_sample(diffusion, model, x_T, steps=10, eta=0.7, **kw)):
        own = run_loop(generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        fed = run_loop(noise_fn=lambda: torch.randn(x_T.shape, generator=g))  # noqa: B023 (called here)
        assert torch.equal(own, fed)
