"""Seed 001's ``train.py`` (standard training): the same as ``train_curriculum.py`` and ``python -m
ddpm_curriculum.train``, which only calls :func:`run`; the config decides the mode, e.g.
``python train.py --config-path configs/celeba32.json`` (baseline CelebA 32×32). The seed's ddpm-torch flags
are spelled ``--config-path FILE`` (for ``--dataset``), ``--device`` (``--train-device``) and
``--set train.epochs=N`` (``--epochs``)."""

from ddpm_curriculum.train import run

if __name__ == "__main__":
    raise SystemExit(run())
