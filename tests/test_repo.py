"""What the repository may hold: code, configs, docs and the results they cite, but no training binaries.

Every clone carries every version of every file ever committed, so a checkpoint or a model committed once
weighs on the repository for good. A tracked file over ``MAX_BYTES`` fails here unless ``ALLOWED`` names it
with the reason it is a record worth its size; weights, optimizer states and checkpoint folders fail
wherever they are, whatever their size (``.gitignore`` ignores the checkpoints of run folders kept under docs/
and examples/).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from loraqa.layout import CHECKPOINTS_DIR

MAX_BYTES = 1_000_000

# path -> why it is kept although it is over MAX_BYTES; none may grow past ALLOWED_MAX_BYTES
_FULL_SCALING = "docs/study-full/sweeps/full-scaling"
_PER_QUESTION = (
    "the per-question answers and scores on the 10,570 dev questions, which the study's report reads for its "
    "paired differences (docs/study-full)"
)
ALLOWED = {
    f"{_FULL_SCALING}/base/predictions.jsonl": _PER_QUESTION,
    f"{_FULL_SCALING}/train_limit1000/predictions.jsonl": _PER_QUESTION,
    f"{_FULL_SCALING}/train_limit4000/predictions.jsonl": _PER_QUESTION,
    f"{_FULL_SCALING}/train_limit16000/predictions.jsonl": _PER_QUESTION,
    "examples/smollm2-squad/adapter_model.safetensors": (
        "the example run's trained LoRA adapter (SmolLM2-135M on SQuAD, ~6 MB), kept so that a trained run can be "
        "used without training one"
    ),
}
ALLOWED_MAX_BYTES = 8_000_000

# trained weights and training state: a run folder's or checkpoint's, never the repository's
FORBIDDEN_NAMES = {"optimizer.pt", "scheduler.pt", "model.safetensors"}
FORBIDDEN_SUFFIXES = (".bin",)
FORBIDDEN_PREFIXES = ("pytorch_model",)


def tracked_files() -> dict[str, int]:
    """path -> size in bytes of every file git tracks in this checkout (files deleted from the work tree are left
    out); the test is skipped outside a git checkout of this project (an unpacked sdist, say)."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(root)]
    top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        pytest.skip("not a git checkout of this project")
    out = subprocess.run([*git, "ls-files", "-z"], capture_output=True, check=True).stdout
    names = [n for n in out.decode("utf-8", errors="surrogateescape").split("\0") if n]
    return {n: (root / n).stat().st_size for n in names if (root / n).is_file()}


def problems(files: dict[str, int]) -> list[str]:
    """What is wrong with tracking ``files`` (path -> size in bytes), one line a file."""
    out = []
    for name, size in sorted(files.items()):
        path = PurePosixPath(name)
        if (
            path.name in FORBIDDEN_NAMES
            or path.name.endswith(FORBIDDEN_SUFFIXES)
            or path.name.startswith(FORBIDDEN_PREFIXES)
        ):
            out.append(f"{name}: trained weights or training state; git rm --cached it")
        elif CHECKPOINTS_DIR in path.parts[:-1]:
            out.append(f"{name}: in a checkpoints folder; git rm -r --cached the folder")
        elif name in ALLOWED and size > ALLOWED_MAX_BYTES:
            out.append(
                f"{name}: {size:,} bytes, over the {ALLOWED_MAX_BYTES:,} even an allowed file may have"
            )
        elif name not in ALLOWED and size > MAX_BYTES:
            out.append(
                f"{name}: {size:,} bytes, over {MAX_BYTES:,}; keep it out of git, or add it to ALLOWED in "
                "tests/test_repo.py with the reason it is worth its size"
            )
    return out


def test_the_repository_holds_no_binaries_beyond_its_records():
    found = problems(tracked_files())
    assert not found, "\n".join(found)


def test_the_rules_catch_weights_checkpoints_and_large_files():
    allowed = next(iter(ALLOWED))
    files = {
        "README.md": 10_000,
        allowed: MAX_BYTES + 1,
        "docs/run/adapter_model.safetensors": 100_000,  # small and not a full model: allowed
        "docs/run/model.safetensors": 100,
        "docs/run/training_args.bin": 100,
        "docs/run/pytorch_model-00001-of-00002.safetensors": 100,
        "docs/run/checkpoints/checkpoint-5/trainer_state.json": 100,
        "docs/run/checkpoint-5/optimizer.pt": 100,
        "docs/run/predictions.jsonl": MAX_BYTES + 1,
        "examples/big.safetensors": ALLOWED_MAX_BYTES + 1,
    }
    flagged = [line.split(":")[0] for line in problems(files)]
    assert flagged == sorted(set(files) - {"README.md", allowed, "docs/run/adapter_model.safetensors"})


def test_the_readme_architecture_names_every_module():
    """Each module of the package is named in the README's Architecture section, and each name there exists."""
    root = Path(__file__).resolve().parents[1]
    package = root / "src" / "loraqa"
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    modules = {p.stem for p in package.rglob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.rglob("__init__.py") if p.parent != package}
    named = set(re.findall(r"`([a-z_]+)/?`", section))
    assert not modules - named, f"not in the README's Architecture section: {sorted(modules - named)}"
    missing = {w for w in re.findall(r"\(`([a-z_]+)/?`\)", section) if w not in modules}
    assert not missing, f"named as a stage's module in the README but not in the package: {sorted(missing)}"
