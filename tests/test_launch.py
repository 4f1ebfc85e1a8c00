"""The command starts under tcmalloc where the system has it (loraqa.launch): when it restarts, with what, and
that a run records the allocator it ran under."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraqa.launch import ALLOCATOR_ENV, REPORT_THRESHOLD, find_tcmalloc, library_dirs, preloaded_env

LIB = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_the_command_restarts_preloading_tcmalloc_unless_told_or_already_preloaded():
    env = preloaded_env({"PATH": "/bin"}, LIB)
    assert env["LD_PRELOAD"] == str(LIB) and env["PATH"] == "/bin" and int(env[REPORT_THRESHOLD]) >= 1 << 40
    assert preloaded_env({"LD_PRELOAD": "/opt/libfoo.so"}, LIB)["LD_PRELOAD"] == f"{LIB}:/opt/libfoo.so"
    assert preloaded_env({ALLOCATOR_ENV: "tcmalloc"}, LIB)["LD_PRELOAD"] == str(LIB)
    assert preloaded_env({REPORT_THRESHOLD: "5"}, LIB)[REPORT_THRESHOLD] == "5"  # the user's own setting
    assert preloaded_env({ALLOCATOR_ENV: "system"}, LIB) is None
    assert preloaded_env({}, None) is None  # no library on this system
    for chosen in (str(LIB), "/usr/lib/libjemalloc.so.2"):  # the restarted process, or the user's allocator
        assert preloaded_env({"LD_PRELOAD": chosen}, LIB) is None
    with pytest.raises(ValueError, match=f"^{ALLOCATOR_ENV}=jemalloc: give one of tcmalloc, system$"):
        preloaded_env({ALLOCATOR_ENV: "jemalloc"}, LIB)


def test_the_library_is_found_in_the_first_folder_that_has_it(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
    assert find_tcmalloc([first, second]) is None
    (second / "libtcmalloc.so.4").write_bytes(b"")
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc([first, second]) == first / "libtcmalloc_minimal.so.4"


def trained_allocator(tmp_path: Path, synthetic_dir: Path, **env: str) -> str:
    """``metrics.json``'s allocator of a 1-step run started as a user starts it: ``python -m loraqa.cli``."""
    out = tmp_path / "run"
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    cmd = [sys.executable, "-m", "loraqa.cli", "train", "--model", "tiny-random-gpt2", "--data-dir",
           str(synthetic_dir), "--train-limit", "8", "--eval-limit", "2", "train.max_steps=1", "-o", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env={**environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "metrics.json").read_text())["allocator"]


@pytest.mark.skipif(find_tcmalloc(library_dirs()) is None, reason="no tcmalloc on this system")
def test_a_run_started_from_the_command_line_trains_under_tcmalloc_and_records_it(tmp_path, synthetic_dir):
    assert trained_allocator(tmp_path / "default", synthetic_dir) == "tcmalloc"
    assert trained_allocator(tmp_path / "system", synthetic_dir, **{ALLOCATOR_ENV: "system"}) == "system"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_main_called_with_arguments_never_restarts_but_the_command_line_does(monkeypatch, capsys):
    from loraqa import cli

    restarts = []
    monkeypatch.setattr(os, "execve", lambda *a: restarts.append(a))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert cli.main(["params", "--model", "gpt2"]) == 0  # from Python: this process, as it is
    assert restarts == []
    monkeypatch.setattr(sys, "argv", ["loraqa", "params", "--model", "gpt2"])
    monkeypatch.setattr("loraqa.launch.find_tcmalloc", lambda dirs: LIB)
    assert cli.main() == 0  # execve is stubbed out: the command goes on here after asking for the restart
    assert len(restarts) == 1
    executable, args, env = restarts[0]
    assert (
        args == [sys.executable, "-m", "loraqa.cli", "params", "--model", "gpt2"]
        and executable == sys.executable
    )
    assert env["LD_PRELOAD"] == str(LIB)
