"""ExecuTorch's runtime with the XNNPACK backend on the bundle's ``model.pte`` (exported for batch 1)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qkit.bench.timing import example_input

from importlib.metadata import version

try:  # the runtime imports torch; importing here keeps that out of the measured load time
    import executorch
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from qkit.export.executorch import load_method
except ImportError:
    executorch = None


def unavailable(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]) -> str | None:
    if executorch is None:
        return "not installed (pip install -e '.[mobile]')"
    if "model.pte" not in facts["files"]:
        why = facts["pte"].get("skipped", "export with --mobile")
        return f"no model.pte in the bundle ({why})"
    if spec["batch"] != 1:
        return "model.pte is exported for batch 1"
    return None


def load(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]):
    _unsafe_reset_threadpool(spec["threads"])
    method = load_method(bundle / "model.pte")
    x = torch.from_numpy(example_input(facts, 1))
    report = facts["pte"]
    executed = {k: report[k] for k in ("compute_nodes", "compute_delegated", "compute_int8") if k in report}
    return (lambda: method.execute([x])), {"file": "model.pte", "file_bytes": (bundle / "model.pte").stat().st_size,
                                           "runtime_version": version("executorch"),
                                           "executed": executed}
