"""diffquant's Hydra sweeper plugin (Hydra finds sweepers only under the ``hydra_plugins`` package).

See :mod:`hydra_plugins.diffquant_sweeper.grid_sweeper`.
"""
