"""The README's own-training-loop example runs as written and gives a bundle that passes its check."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_own_training_loop_example_runs(tmp_path):
    text = README.read_text()
    block = re.search(r"<!-- readme-own-loop:.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    assert "qkit.quantize(" in block and "qkit.convert(" in block and "qkit.export(model" in block
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    top1, agreement = map(float, out.stdout.split()[-2:])
    assert top1 > 85.0 and agreement >= 99.5
    assert (tmp_path / "export" / "mine" / "model.onnx").is_file()
