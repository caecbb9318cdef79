"""Class conditioning (seed 002): the class embedding, classifier-free guidance, labels in training (exact
resume, DDP), generate.py's class flags, EMA update_every/start_step, early stopping, and labelled image folders
with their decoded-image cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_curriculum.config import config_from_dict
from ddpm_curriculum.data import build_dataset, class_counts
from ddpm_curriculum.diffusion import ddim_sample
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.models import UNet
from ddpm_curriculum.sampling import SamplerSpec, sample_batch
from ddpm_curriculum.sampling.guidance import ClassConditioned, image_labels
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.checkpoint import load_checkpoint
from ddpm_curriculum.training.early_stop import EarlyStop
from ddpm_curriculum.training.ema import EMA
from .helpers import TINY, assert_same_state, run, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
COND = ("model.num_classes=4", "train.cond_drop_prob=0.3")  # twoscale k1=k2=2: 4 classes


def small_unet(num_classes=3):
    """A small UNet whose zero-ish initialised convolutions are re-initialised, so that every input matters."""
    torch.manual_seed(0)
    net = UNet(3, 32, ch_multipliers=(1, 2), num_res_blocks=1, apply_attn=(False, True), norm_groups=16,
               num_classes=num_classes).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.xavier_uniform_(m.weight)
    return net


def _inputs(b=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 8, 8, generator=g), torch.tensor([3, 10, 50, 99])[:b]


# ------------------------------------------------------------------------------ the network


def test_class_embedding_changes_the_output_and_receives_gradients():
    net = small_unet()
    x, t = _inputs()
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    # zero-initialised: at first every label (and none) computes the unconditional network
    assert torch.equal(net(x, t, y0), net(x, t, y1))
    out = net(x, t, torch.tensor([0, 1, 2, 0]))
    out.square().mean().backward()
    grad = net.class_embed.weight.grad
    assert grad[:3].abs().sum(1).min() > 0  # the used rows
    assert torch.equal(grad[3], torch.zeros_like(grad[3]))  # the null label was not used
    with torch.no_grad():
        net.class_embed.weight.normal_()
        a, b = net(x, t, y0), net(x, t, y1)
        assert (a - b).abs().max() > 1e-2 * a.abs().max()
    assert "class_embed.weight" not in small_unet(0).state_dict()
    with pytest.raises(ValueError, match="unconditional"):
        small_unet(0)(x, t, y0)


def test_unconditional_branch_is_the_model_with_the_null_label():
    net = small_unet()
    with torch.no_grad():
        net.class_embed.weight.normal_()
        x, t = _inputs()
        null = torch.full((4,), 3, dtype=torch.long)
        assert torch.equal(net(x, t), net(x, t, null))
        # w = −1 keeps only the unconditional pass: (1 − 1)·eps_c + 1·eps_u
        assert torch.equal(ClassConditioned(net, torch.zeros(4, dtype=torch.long), -1.0)(x, t), net(x, t, null))


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.num_classes, self.labels = net, net.num_classes, []

    def forward(self, x, t, y=None):
        self.labels.append(y.tolist())
        return self.net(x, t, y)


def test_guidance_zero_is_conditional_sampling_exactly_and_w_follows_the_formula():
    from ddpm_curriculum.sampling import PerImageNoise
    from ddpm_curriculum.training import builders

    diffusion = builders.make_diffusion(tiny_cfg())
    net = small_unet()
    with torch.no_grad():
        net.class_embed.weight.normal_()
    counting = CountingNet(net)
    labels = [2, 0, 1]
    spec = SamplerSpec(use_ddim=True, steps=4)
    got = sample_batch(diffusion, counting, spec, [5, 6, 7], 3, (3, 8, 8), CPU, labels=labels, guidance=0.0)
    assert counting.labels == [labels] * 4  # no unconditional pass
    x_T = PerImageNoise(3, [5, 6, 7], (3, 8, 8), CPU).initial()
    y = torch.tensor(labels)
    ref = ddim_sample(diffusion, lambda x, t: net(x, t, y), x_T, steps=4)
    assert torch.equal(got, ref)
    # w = 2: one conditional and one null-label pass per step, combined as (1 + w)·eps_c − w·eps_u
    x, t = _inputs(3)
    with torch.no_grad():
        want = 3.0 * net(x, t, y) - 2.0 * net(x, t, torch.full((3,), 3))
        torch.testing.assert_close(ClassConditioned(net, y, 2.0)(x, t), want, rtol=0, atol=1e-6)
    assert image_labels("balanced", range(7, 12), 4) == [3, 0, 1, 2, 3]
    with pytest.raises(UserError, match="not in 0 … 3"):
        image_labels(4, [0], 4)


# ------------------------------------------------------------------------------ training


def test_resume_with_labels_and_label_dropout_is_bit_identical(tmp_path):
    cfg = tiny_cfg(*COND, "train.steps=8", "eval.num_samples=0")
    full = run(cfg, tmp_path / "full")
    assert cfg.dataset.class_names == ["0.0", "0.1", "1.0", "1.1"]
    assert full.model.class_embed.weight.abs().sum() > 0
    part = tmp_path / "part"
    run(tiny_cfg(*COND, "train.steps=8", "eval.num_samples=0"), part, stop_at_step=3)
    resumed = run(config_from_dict(load_checkpoint(part)["config"]), part, resume_state=load_checkpoint(part))
    assert resumed.step == 8
    assert_same_state(full, resumed)
    assert load_checkpoint(part)["config"]["dataset"]["class_names"] == ["0.0", "0.1", "1.0", "1.1"]


def test_label_dropout_uses_the_null_label_at_the_configured_rate(tmp_path):
    trainer = CurriculumTrainer(tiny_cfg(*COND), tmp_path, CPU, progress=False)
    labels = torch.arange(8) % 4
    drops = []
    for step in range(200):
        trainer.step = step
        y = trainer._draw_labels(labels, 8)
        kept = y != 4
        assert torch.equal(y[kept], labels[kept])
        drops.append((~kept).float().mean())
    assert abs(float(torch.stack(drops).mean()) - 0.3) < 0.04  # 1600 Bernoulli(0.3): std 0.011


def test_conditional_model_needs_a_labelled_dataset(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"] = {"name": "image_folder", "root": str(folder), "image_size": 8}
    with pytest.raises(UserError, match="needs class labels.*dataset.labels=subfolders"):
        CurriculumTrainer(config_from_dict(cfg, ["model.num_classes=2"]), tmp_path / "r", CPU, progress=False)
    with pytest.raises(UserError, match="has 4 classes.*model.num_classes=4"):
        CurriculumTrainer(tiny_cfg("model.num_classes=3"), tmp_path / "r", CPU, progress=False)
    with pytest.raises(UserError, match="cond_drop_prob"):
        tiny_cfg("train.cond_drop_prob=0.1")


def _ddp_worker(rank, world, port, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from ddpm_curriculum import dist

    torch.set_num_threads(1)
    dist.init("cpu")
    trainer = run(tiny_cfg(*COND, "model.drop_rate=0.0", "eval.num_samples=0", "train.steps=8"), run_dir)
    torch.save({"model": trainer.model.state_dict(), "step": trainer.step}, f"{out}/rank{rank}.pt")
    dist.cleanup()


@pytest.mark.slow
def test_two_gloo_ranks_with_labels_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from ddpm_curriculum.dist import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 8
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"ranks differ in {k}"
    single = run(tiny_cfg(*COND, "model.drop_rate=0.0", "eval.num_samples=0", "train.steps=8"), tmp_path / "single")
    log = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(log(tmp_path / "ddp"), log(tmp_path / "single"), rtol=1e-5, atol=0)
    torch.testing.assert_close(r0["model"]["class_embed.weight"], single.model.class_embed.weight.detach(),
                               atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------ EMA and early stopping


def test_ema_update_every_and_start_step_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5, update_every=2, start_step=4)
    expected, n = 0.0, 0
    for step, w in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.after_step(model, step)
        # by hand: steps 1, 3, 5, 7 do nothing; step 2 (< 4) copies; 4, 6, 8 average with
        # d = min(0.5, (1 + n)/(10 + n)) where n counts averaging updates only
        if step == 2:
            expected = 2.0
        elif step in (4, 6, 8):
            n += 1
            d = min(0.5, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * w
        assert ema.model.weight.item() == pytest.approx(expected, abs=1e-6), step
    assert ema.num_updates == 3
    # the config's aliases (seed 002's names) set the same keys
    cfg = tiny_cfg("train.ema_update_rate=2", "train.ema_start=4")
    assert (cfg.train.ema_update_every, cfg.train.ema_start_step) == (2, 4)
    with pytest.raises(UserError, match="given twice"):
        tiny_cfg("train.ema_update_rate=2", "train.ema_update_every=3")


def test_early_stop_on_synthetic_loss_sequences():
    flat = EarlyStop(0.01, window=5, smoothing=0.5)
    assert [s for s in range(1, 40) if flat.update(s, 1.0)][:1] == [10]  # first check at 2·window
    assert flat.stopped_at == 10 and flat.last_change == 0.0
    # a loss falling 5% per step: the smoothed loss changes by far more than 1% per window of 5
    falling = EarlyStop(0.01, window=5, smoothing=0.5)
    assert not any(falling.update(s, 0.95 ** s) for s in range(1, 60))
    # a plateau after a fall: stops at the first window check whose change is below the threshold
    seq = [1.0 / s for s in range(1, 21)] + [0.05] * 40
    plateau, smoothed, at = EarlyStop(0.02, window=10, smoothing=0.8), None, {}
    for s, loss in enumerate(seq, 1):
        smoothed = loss if smoothed is None else 0.8 * smoothed + 0.2 * loss
        at[s] = smoothed
        if plateau.update(s, loss):
            break
    stop = plateau.stopped_at
    assert stop is not None and stop % 10 == 0
    assert abs(at[stop] - at[stop - 10]) / at[stop - 10] < 0.02
    assert all(abs(at[s] - at[s - 10]) / at[s - 10] >= 0.02 for s in range(20, stop, 10))
    # a skipped (non-finite) step does not enter the average; the state round-trips
    again = EarlyStop(0.01, window=5, smoothing=0.5)
    again.load_state_dict(json.loads(json.dumps(plateau.state_dict())))
    assert again.stopped_at == stop and again.update(stop + 1, None)


def test_trainer_stops_early_and_says_so(tmp_path, capsys):
    trainer = run(tiny_cfg("train.early_stop_loss_change=1e9", "train.early_stop_window=3", "eval.num_samples=0"),
                  tmp_path)
    assert trainer.step == 6 and trainer.early_stop.stopped_at == 6
    assert "early stop at step 6" in capsys.readouterr().out
    assert load_checkpoint(tmp_path)["step"] == 6
    assert (tmp_path / "samples" / "step00000006_final.png").is_file()


def test_conditional_grid_has_one_row_per_class(tmp_path):
    from ddpm_curriculum.training.trainer import grid_layout

    labels, per_row = grid_layout(9, 4)
    assert per_row == 2 and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert grid_layout(2, 4)[0].tolist() == [0, 1, 2, 3]
    assert grid_layout(64, 0) == (None, None)
    run(tiny_cfg(*COND, "curriculum.enabled=false", "train.steps=2", "train.num_samples=8", "eval.num_samples=0"),
        tmp_path)
    with Image.open(tmp_path / "samples" / "step00000002_final.png") as im:  # 4 rows of 2 8×8 images
        assert im.size == (2 * 8 + 3 * 2, 4 * 8 + 5 * 2)


# ------------------------------------------------------------------------------ generate.py


def gen(*args):
    return subprocess.run([sys.executable, "generate.py", *args], capture_output=True, text=True, timeout=300,
                          check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cond_run")
    run(tiny_cfg(*COND, "train.steps=6", "train.lr=0.02", "train.use_ema=false", "eval.num_samples=0",
                 "train.image_intv=0", "train.num_samples=0"), run_dir)
    return run_dir


@pytest.mark.slow
def test_generate_classes_guidance_manifest_and_continuation(cond_run, tmp_path):
    from ddpm_curriculum.sampling.cli import main

    common = ["--chkpt-path", str(cond_run), "--device", "cpu", "--no-progress", "--grid", "0", "--use-ddim",
              "--ddim-steps", "3", "--seed", "2"]
    assert main([*common, "--num-samples", "6", "--classes", "balanced", "--guidance", "1.5",
                 "--save-dir", str(tmp_path / "full")]) == 0
    manifest = json.loads((tmp_path / "full" / "generate.json").read_text())
    assert manifest["conditioning"] == {"classes": "balanced", "guidance": 1.5,
                                        "class_names": ["0.0", "0.1", "1.0", "1.1"]}
    # partial generation, continued with another batch size: the same bytes
    assert main([*common, "--num-samples", "2", "--classes", "balanced", "--guidance", "1.5", "--batch-size", "1",
                 "--save-dir", str(tmp_path / "part")]) == 0
    assert main([*common, "--num-samples", "6", "--classes", "balanced", "--guidance", "1.5", "--batch-size", "4",
                 "--save-dir", str(tmp_path / "part")]) == 0
    for i in range(6):
        name = f"{i:06d}.png"
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    # image 1 (class 1 under balanced) is the same image with --class-label 1; other w gives other images
    assert main([*common, "--num-samples", "2", "--class-label", "1", "--guidance", "1.5",
                 "--save-dir", str(tmp_path / "k1")]) == 0
    assert (tmp_path / "k1" / "000001.png").read_bytes() == (tmp_path / "full" / "000001.png").read_bytes()
    assert main([*common, "--num-samples", "2", "--class-label", "1", "--save-dir", str(tmp_path / "w0")]) == 0
    assert (tmp_path / "w0" / "000001.png").read_bytes() != (tmp_path / "full" / "000001.png").read_bytes()
    # another guidance in the same folder is refused, not mixed
    res = gen(*common, "--num-samples", "6", "--classes", "balanced", "--save-dir", str(tmp_path / "full"))
    assert res.returncode == 2 and "conditioning" in res.stderr and "Traceback" not in res.stderr
    res = gen(*common, "--num-samples", "2", "--class-label", "4", "--save-dir", str(tmp_path / "bad"))
    assert res.returncode == 2 and "not in 0 … 3" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow
def test_generate_refuses_class_flags_for_unconditional_networks(tmp_path):
    run_dir = tmp_path / "u"
    run(tiny_cfg("curriculum.enabled=false", "train.steps=2", "eval.num_samples=0", "train.num_samples=0"), run_dir)
    res = gen("--chkpt-path", str(run_dir), "--device", "cpu", "--no-progress", "--num-samples", "1",
              "--guidance", "1", "--save-dir", str(tmp_path / "g"))
    assert res.returncode == 2 and "is unconditional" in res.stderr and res.stderr.count("\n") == 1


# ------------------------------------------------------------------------------ labelled image folders


def _folder(root: Path, classes=("cat", "dog", "ant"), per_class=(3, 2, 4), size=(10, 12)):
    rng = np.random.default_rng(0)
    for name, n in zip(classes, per_class, strict=True):
        for i in range(n):
            sub = root / name / ("deep" if i == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return root


def test_subfolder_labels_follow_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder as TV

    root = _folder(tmp_path / "data" / "train")
    (tmp_path / "data" / "train" / "loose.png").write_bytes((root / "cat" / "01.png").read_bytes())  # ignored
    _folder(tmp_path / "data" / "test", per_class=(1, 1, 1))
    ds = build_dataset("image_folder", root=str(tmp_path / "data"), image_size=8, labels="subfolders",
                       folder_split="train")
    ref = TV(str(root))
    assert ds.class_names == ref.classes == ["ant", "cat", "dog"]
    assert [(str(f), y) for f, y in zip(ds.files, ds.labels, strict=True)] == ref.samples
    assert [ds[i][1] for i in range(len(ds))] == ref.targets
    assert class_counts(ds) == {"ant": 4, "cat": 3, "dog": 2}
    test = build_dataset("image_folder", root=str(tmp_path / "data"), image_size=8, labels="subfolders",
                         folder_split="test")
    assert len(test) == 3 and test.class_names == ds.class_names
    with pytest.raises(UserError, match="split folder .*val not found.*'test', 'train'"):
        build_dataset("image_folder", root=str(tmp_path / "data"), image_size=8, folder_split="val")
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="class folder .*empty has no images"):
        build_dataset("image_folder", root=str(root), image_size=8, labels="subfolders")


def _folder_cfg(root, **dataset):
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"] = {"name": "image_folder", "root": str(root), "image_size": 8, "labels": "subfolders", **dataset}
    cfg["train"].update(batch_size=4, steps=2, num_samples=0)
    cfg["curriculum"] = {"enabled": False}
    cfg["eval"] = {"num_samples": 0}
    return cfg


def test_class_names_are_recorded_and_checked(tmp_path):
    root = _folder(tmp_path / "d")
    cfg = config_from_dict(_folder_cfg(root), ["model.num_classes=3", "train.cond_drop_prob=0.1"])
    trainer = run(cfg, tmp_path / "run")
    assert trainer.cfg.dataset.class_names == ["ant", "cat", "dog"]
    assert load_checkpoint(tmp_path / "run")["config"]["dataset"]["class_names"] == ["ant", "cat", "dog"]
    wrong = config_from_dict(_folder_cfg(root, class_names=["ant", "dog", "cat"]), ["model.num_classes=3"])
    with pytest.raises(UserError, match="class_names.*but the dataset's classes are"):
        CurriculumTrainer(wrong, tmp_path / "r2", CPU, progress=False)
    with pytest.raises(UserError, match="applies to dataset 'image_folder' only"):
        tiny_cfg("dataset.labels=subfolders")


def train_script(*args):
    return subprocess.run([sys.executable, "train_curriculum.py", *args], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_dry_run_counts_images_per_class(tmp_path):
    root = _folder(tmp_path / "d")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_folder_cfg(root)))
    res = train_script("--config-path", str(path), "--dry-run", "--set", "model.num_classes=3")
    assert res.returncode == 0, res.stderr
    assert "classes (3; model class-conditional, 3 classes, cond_drop_prob 0): ant 4, cat 3, dog 2" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_corrupt_file_in_a_labelled_folder_is_one_line_with_workers(tmp_path, cache):
    root = _folder(tmp_path / "d", per_class=(4, 4, 4))
    (root / "dog" / "02.png").write_bytes(b"not an image")
    cfg = _folder_cfg(root, cache=cache, cache_dir=str(tmp_path / "cache"))
    cfg["train"].update(num_workers=2, batch_size=4, steps=3)  # one epoch reads every image
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    res = train_script("--config-path", str(path), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                       "--no-progress", "--set", "model.num_classes=3")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "worker" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"cannot read image {root / 'dog' / '02.png'}" in errors[0]


def test_decoded_image_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from ddpm_curriculum.data import images

    root = _folder(tmp_path / "d")
    kw = {"root": str(root), "image_size": 8, "labels": "subfolders", "cache": True,
          "cache_dir": str(tmp_path / "c")}
    first = build_dataset("image_folder", **kw)
    plain = build_dataset("image_folder", root=str(root), image_size=8, labels="subfolders")
    for i in range(len(plain)):
        assert torch.equal(first[i][0], plain[i][0]) and first[i][1] == plain[i][1]
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(images, "load_image", no_decoding)
    again = build_dataset("image_folder", **kw)
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    monkeypatch.undo()
    # an edited file (new size and mtime) is a new key: decoded again, into a second cache file
    Image.new("RGB", (9, 9), (255, 0, 0)).save(root / "cat" / "01.png")
    os.utime(root / "cat" / "01.png", ns=(1, 1))
    edited = build_dataset("image_folder", **kw)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2
    i = [str(f) for f in edited.files].index(str(root / "cat" / "01.png"))
    assert edited.images[i].reshape(-1, 3).tolist() == [[255, 0, 0]] * 64
    # the cache directory may come from the environment (.env)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "env_cache"))
    build_dataset("image_folder", **{**kw, "cache_dir": None})
    assert len(list((tmp_path / "env_cache").glob("*.npy"))) == 1
