"""``import rslora_deploy`` must not pull in torch, gptqmodel or onnxruntime (fast CLI start)."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import sys, rslora_deploy, rslora_deploy.cli.app; "
        "heavy = [m for m in ('torch', 'gptqmodel', 'onnxruntime', 'onnxruntime_genai', "
        "'transformers', 'peft') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
