"""The names of the files loraqa writes, in one place: a run folder (``loraqa train``), a sweep folder and its
trial folders (``loraqa sweep``), a report (``loraqa report``). No imports, so that the sweep scheduler and
the report, which read these folders without loading a model, share them with the code that writes them;
the SQuAD files of a data folder, and loraqa's cache folder.
What each file holds: :mod:`loraqa.runfolder` (a run folder) and :mod:`loraqa.sweep.state` (a sweep folder)."""

# a run folder
CONFIG_FILE = "config.yaml"
LOG_FILE = "log_history.jsonl"
TRAIN_METRICS_FILE = "train_metrics.json"  # training has finished
PREDICTIONS_FILE = "predictions.jsonl"
OFFICIAL_PREDICTIONS_FILE = "predictions.json"
MODEL_CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"  # written last: the run is done
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"  # `tensorboard --logdir` a sweep folder finds every trial's
CLOCK_FILE = "loraqa_clock.json"  # in each checkpoint: train time, tokens and peak memory so far
ERROR_FILE = "error.json"
LOCK_FILE = ".loraqa.lock"
ANSWER_JOURNAL_FILE = "answers.partial.jsonl"  # an evaluation under way: its answers so far (loraqa.journal)
ANSWER_JOURNALS = ANSWER_JOURNAL_FILE.replace(".jsonl", "*.jsonl")  # every process's (a glob pattern)
SAVING_DIR = ".saving"  # the trained model being saved; its files move into the run folder once written
# the names the Trainer and PEFT give what they write (transformers' PREFIX_CHECKPOINT_DIR, TRAINER_STATE_NAME
# and SAFE_WEIGHTS_NAME, PEFT's SAFETENSORS_WEIGHTS_NAME), here so that the folder readers need neither library;
# tests/test_imports.py checks that they agree
CHECKPOINT_PREFIX = "checkpoint-"  # a checkpoint folder: checkpoint-<step>, under CHECKPOINTS_DIR
TRAINER_STATE_FILE = "trainer_state.json"  # in each checkpoint, written last
FULL_WEIGHTS_FILE = "model.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CONFIG_FILE = "config.json"  # beside FULL_WEIGHTS_FILE (transformers' CONFIG_NAME)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # beside ADAPTER_WEIGHTS_FILE (PEFT's CONFIG_NAME)
# the suffixes of weights and training state: safetensors, and torch.save's zip archives (a checkpoint's
# optimizer.pt, rng_state.pth, training_args.bin)
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SAVE_SUFFIXES)

# a sweep folder: these, and a trial folder per trial (a run folder, plus the TRIAL_ files)
SWEEP_CONFIG_FILE = "sweep.yaml"
SWEEP_INDEX_FILE = "sweep.json"
SWEEP_INDEX_LOCK_FILE = ".sweep.lock"  # flock-ed while a sweep rewrites sweep.json
TRIAL_CONFIG_FILE = "trial.yaml"  # the trial's resolved config, which its `loraqa train` runs
TRIAL_RUN_FILE = "run.json"  # the trial's attempts: when, where, how each ended
TRIAL_LOG_FILE = "trial.log"  # the trial process's stdout and stderr
TRIAL_LOCK_FILE = ".lock"  # flock-ed by the sweep running the trial
SEARCH_STUDY_FILE = "search.db"  # sweep.mode search: the Optuna study (SQLite), next to one folder per trial
SEARCH_BEST_FILE = "best.yaml"  # the best trial's config, ready to run (``loraqa report``)

# a report folder (``loraqa report``: the sweep folder, or --out)
REPORT_FILE = "report.md"
RESULTS_FILE = "results.csv"
FIGURES_DIR = "figures"

# a SQuAD data folder (data.data_dir, else the folder DATA_DIR_ENV names, else CACHE_SQUAD_DIR below): the
# official v1.1 files, each as is or gzipped (.gz)
DATA_DIR_ENV = "LORAQA_DATA_DIR"
SQUAD_TRAIN_FILE = "train-v1.1.json"
SQUAD_DEV_FILE = "dev-v1.1.json"

# an exported model folder (loraqa export): its run's config under a name of its own (config.yaml marks a run)
EXPORT_CONFIG_FILE = "loraqa-config.yaml"


def export_temporaries(out_dir, pid: int | str = "*") -> tuple[str, str]:
    """The names, beside ``out_dir`` (a ``pathlib.Path``), of an export under way by process ``pid`` (``*``: a
    glob pattern for any process): its new folder, and the previous export moved aside for the swap."""
    import glob

    name = out_dir.name if pid != "*" else glob.escape(out_dir.name)
    return f".{name}.exporting-{pid}", f".{name}.exporting-{pid}-replaced"


# loraqa's cache folder (cache_dir()): what is made once a machine and may be deleted at any time
CACHE_SQUAD_DIR = "squad"  # the official SQuAD files, downloaded
CACHE_SYNTHETIC_DIR = "synthetic-v1"  # the generated stand-in for SQuAD
CACHE_GPT2_TOKENIZER_DIR = "gpt2-tokenizer"  # the GPT-2 BPE files under their Hugging Face names
CACHE_GGUF_DIR = "gguf"  # a GGUF file converted once into a float model folder (loraqa.gguf)


def cache_dir():
    """loraqa's cache folder: ``$XDG_CACHE_HOME/loraqa``, by default ``~/.cache/loraqa``."""
    import os
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraqa"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def rank_journal(journal, rank: int, world_size: int):
    """The journal of one process's share of the answers, for the journal path of a single process (a
    ``pathlib.Path``): itself when a single process answers, else ``….rank<i>.jsonl``."""
    if world_size == 1:
        return journal
    return journal.with_name(f"{journal.name.removesuffix('.jsonl')}.rank{rank}.jsonl")


def prediction_journal(output):
    """The journal of ``loraqa predict -o OUTPUT`` (a ``pathlib.Path``): the answers so far, beside the output."""
    return output.with_name(f"{output.name}.partial.jsonl")


def prediction_journals(output):
    """Every process's journal of ``loraqa predict -o OUTPUT``: :func:`prediction_journal` itself and, under
    torchrun, its :func:`rank_journal` shares."""
    import glob

    stem = prediction_journal(output).name.removesuffix(".jsonl")
    return sorted(output.parent.glob(f"{glob.escape(stem)}*.jsonl"))


def search_trial_name(number: int) -> str:
    """The folder of a search's trial ``number`` (Optuna's, from 0): ``trial-000``, ``trial-001``, ..."""
    return f"trial-{number:03d}"


def search_storage(sweep_dir) -> str:
    """The Optuna storage URL of the search in ``sweep_dir`` (SQLite, an absolute path: trial processes and
    Ray tasks may run in other working folders)."""
    from pathlib import Path

    return f"sqlite:///{Path(sweep_dir).resolve() / SEARCH_STUDY_FILE}"


def sweep_command(sweep_dir, show=str) -> str:
    """The command that reruns or resumes the sweep in ``sweep_dir`` from the config it saved there. ``show``
    renders each path: ``shlex.quote`` for a shell, a portable form for a report."""
    return f"loraqa sweep {show(sweep_dir / SWEEP_CONFIG_FILE)} --output-dir {show(sweep_dir)}"
