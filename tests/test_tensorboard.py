"""The optional TensorBoard sink (train.tensorboard): it holds exactly metrics.jsonl's numeric fields at their
steps, is off by default, and without the tensorboard package the run stops at start-up with one line."""

import sys

import numpy as np
import pytest

from ddpm_curriculum.config import read_jsonl
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.reporting import scalar_fields

from .helpers import CPU, run, tiny_cfg

TB_RUN = ["train.steps=6", "train.log_intv=2", "eval.num_samples=0", "train.num_samples=0", "train.image_intv=0",
          "train.tensorboard=true"]


def expected_scalars(record: dict) -> dict[str, float]:
    """metrics.jsonl's numeric fields by TensorBoard tag, flattened by hand: lists as name/i, None left out."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, (str, bool)):
            continue
        if isinstance(value, list):
            out.update({f"{key}/{i}": v for i, v in enumerate(value) if v is not None})
        else:
            out[key] = value
    return out


def test_scalar_fields_keep_numbers_and_flatten_lists():
    rec = {"step": 4, "stage": "high", "loss": 0.5, "n": 3, "flag": True, "none": None,
           "loss_per_t_bin": [0.25, None, 1.0], "nested": {"a": 2.0, "b": "x"}}
    assert dict(scalar_fields(rec)) == {"loss": 0.5, "n": 3, "loss_per_t_bin/0": 0.25, "loss_per_t_bin/2": 1.0,
                                        "nested/a": 2.0}


@pytest.mark.slow
def test_event_file_holds_the_metrics_jsonl_values_at_their_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = run(tiny_cfg(*TB_RUN), tmp_path)
    assert trainer.log.sink is not None and trainer.log.sink.writer is None  # closed at the end of training
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for tag, value in expected_scalars(r).items():
            expected.setdefault(tag, {})[r["step"]] = value
    assert {"loss", "mse", "lr", "grad_norm", "epoch", "img_per_sec", "t_range/1", "samples_per_t_bin/9"} \
        <= expected.keys()

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(by_step), tag
        for e in events:  # TensorBoard scalars are float32
            assert np.float32(e.value) == np.float32(by_step[e.step]), (tag, e.step)


def test_off_by_default_writes_no_event_file(tiny_run):
    assert not (tiny_run / "tensorboard").exists()


def test_missing_tensorboard_package_is_a_one_line_error_at_startup(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    with pytest.raises(UserError, match=r'pip install -e "\.\[tensorboard\]"') as info:
        CurriculumTrainer(tiny_cfg(*TB_RUN), tmp_path / "run", CPU, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
