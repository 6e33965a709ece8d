"""``ftn sweep``: a grid of runs over any config, learning rates chosen on validation, several
seeds, paired intervals, one results file, a table and a plot (``docs/sweep.md``).

- :mod:`.plan`: the axes, the learning-rate grids (and their extension beyond an edge choice),
  the list of runs;
- :mod:`.run`: training and resuming the runs, the test split scored once per chosen run,
  :func:`run_sweep` (the whole protocol);
- :mod:`.report`: the choices on validation, summaries, intervals, ``results.csv`` / ``.json``,
  the table and the plot;
- :mod:`.sources`: each method's base config (a YAML file or a setting's demo).
"""

from .plan import (DEFAULT_LR_EXTEND, DEFAULT_LR_FACTORS, QUICK, Axis, Run, SweepSpec, lr_grids, parse_axis,
                   parse_lr_grid)
from .report import choose_lr, format_table, pareto_front
from .run import run_sweep

__all__ = ["Axis", "SweepSpec", "Run", "parse_axis", "parse_lr_grid", "lr_grids", "choose_lr", "run_sweep",
           "format_table", "pareto_front", "DEFAULT_LR_FACTORS", "DEFAULT_LR_EXTEND", "QUICK"]
