"""Run-directory policy: never mix two runs in one folder, never lose a finished run to a failed one."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from qkit.errors import QkitError
from qkit.fileio import check_output, new_staging, output_lock, remove_stale
from qkit.quant import Recipe


def default_run_dir(model: str, data: str, recipe: Recipe) -> Path:
    data_name = data.split(":")[0]
    return Path("runs") / f"{model.replace(':', '-').replace('.', '-')}-{data_name}-{recipe.name}"


def is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in ("last.pt", "checkpoint.pt", "metrics.json", "train.log"))


def claim_run_dir(stack: contextlib.ExitStack, run: Path, resuming: bool, overwrite: bool) -> Path:
    """Lock ``run`` for this process and return the folder to write: ``run`` itself when it is new, empty
    or being resumed; with ``overwrite``, a staging folder beside it that replaces it only once the new run
    is complete (an interrupted or failed run leaves the old one as it was)."""
    stack.enter_context(output_lock(run))  # first: another process's run in progress is not ours to judge
    if not resuming:
        if is_run(run) and not overwrite:
            raise QkitError(f"{run} already holds a run: pass --resume to continue it or --overwrite to replace it")
        check_output(run, "run", is_run, overwrite)
    if resuming or not run.exists() or (run.is_dir() and not any(run.iterdir())):
        run.mkdir(parents=True, exist_ok=True)
        return run
    remove_stale(run)
    staged = new_staging(run)
    stack.callback(shutil.rmtree, staged, True)
    return staged
