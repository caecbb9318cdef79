"""Files written by an earlier main keep working: tests/fixtures/compat/v1 holds a mode-CS run directory stopped
at step 6 of 10 and a partial generate.py folder, made by commit 1adca9f (made_by.json; the script that made them
is next to them). Current code must resume the run to the end exactly as it trains the same config from
scratch, and continue the folder exactly as it writes a new one.

Both comparisons are current code against current code. They are bit-exact where this machine computes the
fixture's first steps bit-identically to the machine that made them (checked, not assumed: the same torch build
on another CPU can pick other kernels); elsewhere the fixture's first steps carry other float32 round-off, and
the comparison allows it."""

import json
import shutil

import pytest
import torch

from ddpm_curriculum.config import load_config
from ddpm_curriculum.sampling import SamplerSpec, generate_to_folder
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.checkpoint import load_checkpoint, load_network

from .helpers import CPU, ROOT

FIXTURES = ROOT / "tests/fixtures/compat/v1"
MADE_BY = json.loads((FIXTURES / "made_by.json").read_text())


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(MADE_BY["threads"])
    yield
    torch.set_num_threads(threads)


def computes_like_the_maker(cfg, tmp_path) -> bool:
    """Whether current code on this machine reproduces the fixture's checkpoint at its stop step bit for bit."""
    probe = CurriculumTrainer(cfg, tmp_path, CPU, progress=False, stop_at_step=MADE_BY["stop"])
    probe.train()
    saved = load_checkpoint(FIXTURES / "cs_run")["model"]
    return all(torch.equal(saved[k], v) for k, v in probe.model.state_dict().items())


def assert_states_match(a: dict, b: dict, what: str, exact: bool) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}.{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{what}.{k}")


@pytest.mark.slow
def test_a_run_directory_of_an_earlier_main_resumes_exactly(tmp_path, one_thread):
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURES / "cs_run", run_dir)
    cfg = load_config(run_dir / "config.json")  # written without a 'mode' key: derived
    assert cfg.mode == "CS" and cfg.train.steps == MADE_BY["total"]
    state = load_checkpoint(run_dir, for_resume=True)
    assert state["step"] == MADE_BY["stop"]
    resumed = CurriculumTrainer(cfg, run_dir, CPU, resume_state=state, progress=False)
    resumed.train()
    fresh = CurriculumTrainer(load_config(FIXTURES / "cs_run/config.json"), tmp_path / "new", CPU, progress=False)
    fresh.train()
    assert resumed.step == fresh.step == MADE_BY["total"]
    exact = computes_like_the_maker(cfg, tmp_path / "probe")
    if MADE_BY["torch"] == torch.__version__ and not exact:
        print("note: same torch build as the fixture's maker but other round-off on this CPU; compared to 1e-4")
    assert_states_match(resumed.model.state_dict(), fresh.model.state_dict(), "model", exact)
    assert_states_match(resumed.ema.state_dict(), fresh.ema.state_dict(), "ema", exact)
    assert torch.equal(resumed.model.channel_mask, fresh.model.channel_mask)  # CS's regrown channels
    stages = [json.loads(line)["stage"] for line in (run_dir / "transitions.jsonl").read_text().splitlines()]
    assert stages == ["high", "full"]  # the old stage-1 line, and no second one written at the resume


@pytest.mark.slow
def test_a_partial_sample_folder_of_an_earlier_main_continues(tmp_path, one_thread):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "samples", folder)
    before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert len(before) == MADE_BY["partial"]
    net = load_network(FIXTURES / "cs_run")
    spec, n = SamplerSpec(**MADE_BY["spec"]), 2 * MADE_BY["partial"]
    generate_to_folder(net, spec, folder, n, 2, seed=MADE_BY["seed"], device="cpu", grid=0, progress=False)
    generate_to_folder(net, spec, tmp_path / "new", n, 2, seed=MADE_BY["seed"], device="cpu", grid=0,
                       progress=False)
    old = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    new = {p.name: p.read_bytes() for p in (tmp_path / "new").glob("*.png")}
    assert len(old) == len(new) == n
    assert {k: old[k] for k in before} == before  # the earlier images were kept, not rewritten
    continued = {k: v for k, v in old.items() if k not in before}
    assert len(continued) == n - len(before)
    # the continued images equal a fresh folder's, byte for byte (the kept ones do too where this machine computes
    # like the fixture's maker; elsewhere they carry its round-off)
    assert continued == {k: new[k] for k in continued}
    manifest = json.loads((folder / "generate.json").read_text())
    assert manifest["sampler"] == json.loads((tmp_path / "new/generate.json").read_text())["sampler"]
