"""ddpm-curriculum: timestep- and sparsity-curriculum training of DDPMs.

Layout (one layer per sub-package):
    config      typed JSON experiment configs, overrides, validation
    dist        torchrun / spawn / single-process setup and collectives
    data        datasets (built-in ``twoscale``, CIFAR-10, CelebA, image folders)
    models      networks (UNet) behind a ``MODELS`` registry
    diffusion   schedules, GaussianDiffusion, CurriculumDiffusion, DDIM
    metrics     evaluation metrics (twoscale oracle metrics)
    training    CurriculumTrainer, EMA, checkpoints
"""

__version__ = "0.1.0"
