"""What importing a module brings with it. ``loraqa sync`` and ``loraqa report`` read folders and never load a
model, so they must start without torch (seconds of import, and a machine that only keeps results may not have
it), and the report must not import the sweep scheduler it only reads the records of. Each import runs in a
fresh interpreter, since this one has imported everything already."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def imported_after(module: str) -> set[str]:
    """The modules loaded by ``import module`` in a fresh interpreter running this checkout's code."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["loraqa.sync", "loraqa.report", "loraqa.runfolder", "loraqa.sweep.state"])
def test_reading_folders_does_not_import_torch(module):
    loaded = imported_after(module)
    assert module in loaded
    assert "torch" not in loaded, f"importing {module} imports torch"


@pytest.mark.parametrize("module", ["loraqa.report", "loraqa.sync", "loraqa.sweep"])
def test_reading_sweep_records_does_not_import_the_scheduler(module):
    loaded = imported_after(module)
    scheduler = {"loraqa.sweep.attempt", "loraqa.sweep.driver", "loraqa.sweep.runner"} & loaded
    assert not scheduler, f"importing {module} imports {', '.join(sorted(scheduler))}"


def test_a_training_run_reads_its_search_reporter_without_the_search_driver():
    """``loraqa train`` asks at every start whether it is a search's trial: that must not import the driver's
    side (the scheduler, the runners, the study's sampler) or Optuna itself."""
    loaded = imported_after("loraqa.sweep.reporter")
    driver = {"loraqa.sweep.search", "loraqa.sweep.driver", "loraqa.sweep.attempt", "optuna"} & loaded
    assert not driver, f"importing loraqa.sweep.reporter imports {', '.join(sorted(driver))}"


def test_the_serve_settings_load_without_the_web_framework():
    """``loraqa serve``'s options default to ServeSettings, read when the command line is built."""
    loaded = imported_after("loraqa.serve.settings")
    assert "loraqa.serve.settings" in loaded and not {"fastapi", "uvicorn"} & loaded


def test_the_scheduler_is_still_reachable_from_the_package():
    import loraqa.sweep
    from loraqa.sweep import run_sweep, trial_command
    from loraqa.sweep.attempt import trial_command as from_attempt
    from loraqa.sweep.driver import run_sweep as from_driver

    assert run_sweep is from_driver and trial_command is from_attempt
    assert loraqa.sweep.attempt.trial_command is trial_command  # the modules too, as attributes
    with pytest.raises(AttributeError):
        _ = loraqa.sweep.no_such_name


def test_the_names_layout_gives_the_trainers_files_are_the_libraries_own():
    """layout.py spells out what the Trainer and PEFT name their files (so that folder readers import neither);
    an upgrade that renames one must fail here, not leave checkpoints unseen."""
    from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

    from loraqa import layout

    assert layout.checkpoint_name(12) == f"{PREFIX_CHECKPOINT_DIR}-12"
    assert layout.TRAINER_STATE_FILE == TRAINER_STATE_NAME
    assert (layout.FULL_WEIGHTS_FILE, layout.ADAPTER_WEIGHTS_FILE) == (SAFE_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)
    assert (layout.MODEL_CONFIG_FILE, layout.ADAPTER_CONFIG_FILE) == (CONFIG_NAME, ADAPTER_CONFIG_NAME)
