"""Mixed precision: bf16 autocast on CPU (fp32 master weights, optimizer state, EMA and loss reduction),
its refusal on CPUs without native bf16 and for fp16, and channels_last on networks loaded for sampling."""

import pytest
import torch

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.training import CurriculumTrainer, trainer as trainer_module
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import CPU, run, tiny_cfg

needs_bf16 = pytest.mark.skipif(not trainer_module.cpu_bf16_supported(), reason="this CPU has no native bf16")


def _images(trainer: CurriculumTrainer) -> torch.Tensor:
    return torch.stack([trainer.dataset[i][0] for i in range(trainer.cfg.train.batch_size)])


@pytest.mark.slow
@needs_bf16
def test_bf16_step_on_cpu_keeps_fp32_state_and_a_loss_close_to_fp32(tmp_path):
    fp32 = CurriculumTrainer(tiny_cfg(), tmp_path / "fp32", CPU, progress=False)
    bf16 = CurriculumTrainer(tiny_cfg("train.amp=bf16"), tmp_path / "bf16", CPU, progress=False)
    conv_out = []
    first_conv = next(m for m in bf16.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: conv_out.append(o.dtype))
    images = _images(fp32)
    # the output convolution starts at zero (loss = E[ε²] either way), so compare the second step
    for trainer in (fp32, bf16):
        trainer.train_step(images)
        trainer.step += 1
    loss32, _ = fp32.train_step(images)
    loss16, _ = bf16.train_step(images)
    assert conv_out[0] == torch.bfloat16  # the forward really ran in bf16
    # same batch, t and noise (seeded by the step), same initial weights: bf16 rounding only
    assert loss16 != loss32 and abs(loss16 - loss32) <= 0.02 * loss32
    tensors = {f"model.{k}": v for k, v in bf16.model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in bf16.ema.state_dict().items()}
    for i, state in bf16.optimizer.state.items():
        tensors |= {f"optimizer.{i}.{k}": v for k, v in state.items() if k != "step"}
    tensors |= {f"grad.{k}": p.grad for k, p in bf16.model.named_parameters() if p.grad is not None}
    floats = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
    assert len(floats) > 3 * len(list(bf16.model.parameters()))
    assert {k: d for k, d in floats.items() if d != torch.float32} == {}


@pytest.mark.slow
def test_bf16_on_a_cpu_without_native_bf16_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_bf16_supported", lambda: False)
    with pytest.raises(UserError, match=r"'train.amp' = 'bf16' needs a CPU with native bf16.*set train.amp=none"):
        CurriculumTrainer(tiny_cfg("train.amp=bf16"), tmp_path, CPU, progress=False)
    CurriculumTrainer(tiny_cfg(), tmp_path, CPU, progress=False)  # fp32 is unaffected


def test_the_capability_check_needs_bf16_instructions_not_just_avx512():
    onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not trainer_module.cpu_bf16_supported({"avx512f", "avx512bw", "avx512vl", "avx512dq"})  # emulated only
    assert trainer_module.cpu_bf16_supported({"avx512f", "amx_bf16"}) == onednn
    assert trainer_module.cpu_bf16_supported({"avx512_bf16"}) == onednn


@pytest.mark.slow
def test_fp16_on_cpu_is_refused_and_points_to_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_bf16_supported", lambda: True)
    with pytest.raises(UserError, match=r"'fp16' needs CUDA.*train.amp=bf16"):
        CurriculumTrainer(tiny_cfg("train.amp=fp16"), tmp_path, CPU, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [True, False])
def test_load_network_uses_the_configured_memory_format(tmp_path, channels_last):
    run(tiny_cfg("train.steps=6", "eval.num_samples=0", "train.image_intv=0",
                 f"model.channels_last={str(channels_last).lower()}"), tmp_path)
    convs = [m.weight for m in load_network(tmp_path).model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]  # 1×1 weights are both layouts
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == channels_last
                         and w.is_contiguous() != channels_last for w in convs)
