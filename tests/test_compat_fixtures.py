"""Files written by an earlier main keep working: tests/fixtures/compat/v1 holds a mode-CS run directory stopped
at step 6 of 10 and a partial generate.py folder, made by commit 1adca9f (made_by.json; the script that made them
is next to them). Current code must resume the run to the end exactly as it trains the same config from
scratch, and continue the folder exactly as it writes a new one.

Both comparisons are current code against current code, so they hold on any machine whose arithmetic matches
the one that made the fixtures (the same torch build, one thread): there they are bit-exact. With another torch
the fixture's first steps were computed by other kernels, and the comparison allows float32 round-off."""

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
SAME_BUILD = MADE_BY["torch"] == torch.__version__


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(MADE_BY["threads"])
    yield
    torch.set_num_threads(threads)


def assert_states_match(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if SAME_BUILD:
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
    assert_states_match(resumed.model.state_dict(), fresh.model.state_dict(), "model")
    assert_states_match(resumed.ema.state_dict(), fresh.ema.state_dict(), "ema")
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
    if SAME_BUILD:
        assert old == new  # continued images equal a fresh folder's, byte for byte
    manifest = json.loads((folder / "generate.json").read_text())
    assert manifest["sampler"] == json.loads((tmp_path / "new/generate.json").read_text())["sampler"]
