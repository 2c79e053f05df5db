"""Hydra's basic sweeper, with the settings that follow the model chosen per cell.

``python run.py -m experiment=mine_a,mine_b`` where each experiment names another model: the
settings the user left to the model (``toolkit.model_defaults``: the family's ``module`` preset,
the native ``data.resolution``, the evaluation's reference set and CLIP) depend on the cell, so
they cannot be added to the command line once. Here every cell is composed first (after its
experiment and any override apply, with the sweep's search path), its choices are made from that
config and added to the cell's overrides, so the cell's saved ``.hydra/overrides.yaml`` holds them
(a resume replays them) and each cell logs what was chosen and why. A cell whose choice fails stops
the sweep before any cell starts.

Hydra only loads plugins from the ``hydra_plugins`` namespace package, hence this folder beside
``toolkit/`` (``conf/hydra/default.yaml`` names it as ``hydra.sweeper``).
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class ModelSweeper(BasicSweeper):
    """``BasicSweeper`` (cartesian product of the sweep overrides, in batches) plus, per cell, the
    overrides ``toolkit.model_defaults.cell_overrides`` chooses from the cell's own config."""

    def sweep(self, arguments: list[str]) -> Any:
        from toolkit.model_defaults import cell_overrides

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        cells = self.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]), None)[0]
        # every cell before any starts: a cell that cannot be chosen for stops the sweep here
        self.chosen = {tuple(c): cell_overrides(self.hydra_context.config_loader.load_sweep_config(self.config, c), c)
                       for c in cells}
        return super().sweep(arguments)

    def get_job_batch(self) -> list[list[str]]:
        return [[*cell, *self.chosen[tuple(cell)]] for cell in super().get_job_batch()]
