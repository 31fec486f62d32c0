"""diffquant's Hydra launcher plugin (``hydra/launcher=slurm``); see :mod:`diffquant.launcher`."""
