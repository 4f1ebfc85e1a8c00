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
