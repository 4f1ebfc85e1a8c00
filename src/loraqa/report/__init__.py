"""A sweep's report, regenerated from its folder's files: ``report.md``, ``results.csv`` and figures; and a
study's report, several sweeps read as one (:mod:`loraqa.report.study`).

The report has the reference study's tables (one per swept axis; the best configurations by F1, Table 6; the
trainable parameters, Table 7), its loss figures (eval loss per rank, Figure 3; train and eval loss per target
preset, Figure 4, and per learning rate, Figure 5) and, beside each of the study's claims, the verdict the
sweep's numbers give: "holds", "does not hold" or "not measurable here".

Verdicts are mechanical (the rule is written into the report): an EM/F1 difference counts only where it is
more than twice its standard error, paired over the same dev questions (from ``predictions.jsonl``); a loss
difference only where it is more than 1% and a memory difference only where it is more than 2%. A difference
within that noise is never called "holds". Only finished trials are compared; missing, failed and unfinished
trials are listed as such.

One module a step, each importing only those before it: :mod:`.load` (read a sweep folder), :mod:`.cells` (the
paired difference and the numbers as printed), :mod:`.verdicts`, :mod:`.figures`, :mod:`.render` (one sweep's
report.md and results.csv), :mod:`.study` (several sweeps).
"""

from .cells import Diff, paired_diff
from .figures import draw_figures
from .load import SweepData, TrialResult, load_sweep
from .render import render_report, results_csv, write_report
from .study import write_study_report
from .verdicts import (
    FAILS,
    HOLDS,
    NA,
    Verdict,
    all_verdicts,
    instability,
    roughness,
    verdict_lr_dynamics,
    verdict_rank_smoothness,
)

__all__ = [
    "FAILS",
    "HOLDS",
    "NA",
    "Diff",
    "SweepData",
    "TrialResult",
    "Verdict",
    "all_verdicts",
    "draw_figures",
    "instability",
    "load_sweep",
    "paired_diff",
    "render_report",
    "results_csv",
    "roughness",
    "verdict_lr_dynamics",
    "verdict_rank_smoothness",
    "write_report",
    "write_study_report",
]
