"""A search's trial, in its own process: Optuna's import, the pruner, and the reporter that hands each in-training
score to the study.

``loraqa train`` reads :class:`TrialReporter` at every start, so this module imports only what the trial side needs
(the driver's side, ``loraqa.sweep.search``, imports this one).
"""

from __future__ import annotations

import dataclasses
import os

from ..config import ConfigError
from ..metrics import METRIC

# what a trial process needs to report its scores to the study (set by the driver, read by `loraqa train`)
ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "LORAQA_SEARCH_STORAGE", "LORAQA_SEARCH_STUDY", "LORAQA_SEARCH_TRIAL"
ENV_METRIC, ENV_PRUNER = "LORAQA_SEARCH_METRIC", "LORAQA_SEARCH_PRUNER"


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweep.mode search needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_pruner(name: str, score_steps: int):
    """The pruner ``sweep.pruner`` names, for scores reported every ``score_steps`` optimizer steps.

    Optuna keeps no pruner in the study's storage, so every process that calls ``should_prune`` (each trial's)
    must build this one itself; a study loaded without it prunes by Optuna's default median rule.
    asha's first rung is the first scoring: Optuna's ``min_resource="auto"`` assumes a report at every step and
    would stack several rungs, each keeping a quarter, on one scoring."""
    optuna = import_optuna()
    if name == "asha":  # rungs at score_steps x 4^k: keep the best quarter at scorings 1, 4, 16, ...
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(score_steps, 1))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


@dataclasses.dataclass
class TrialReporter:
    """In a search's trial process (``loraqa train`` started with the ENV_ variables): each in-training score
    goes to the study as the trial's intermediate value; True from :meth:`on_score` stops the trial (pruned),
    by the search's own pruner (``sweep.pruner``, which the driver passes on: the study's storage keeps none)."""

    storage: str
    study_name: str
    number: int
    metric: str
    pruner: str
    score_steps: int

    @classmethod
    def from_env(cls, score_steps: int) -> TrialReporter | None:
        """The reporter of the trial this process runs, or None outside a search; ``score_steps``: the run's
        ``eval.score_steps``, where the pruner's rungs fall."""
        if not os.environ.get(ENV_TRIAL):
            return None
        return cls(os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]),
                   os.environ.get(ENV_METRIC, METRIC), os.environ[ENV_PRUNER], score_steps)  # fmt: skip

    def on_score(self, step: int, scores: dict) -> bool:
        optuna = import_optuna()
        study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                  pruner=make_pruner(self.pruner, self.score_steps))  # fmt: skip
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == self.number)
        if trial.state != optuna.trial.TrialState.RUNNING:  # told already (a resumed, finished trial)
            return False
        live = optuna.trial.Trial(study, trial._trial_id)
        if self.metric in scores:
            live.report(float(scores[self.metric]), step)
        return live.should_prune()
