"""The layering of docs/architecture.md, checked on the source: the model core imports nothing above it, every
import goes down the layers, no two modules import each other (directly or round a circle), nothing reaches
into the benchmarks or the tests, and no function in sharnn/ or train/ is longer than a screen."""

from __future__ import annotations

from tests.helpers import REPO


def test_importing_the_model_loads_no_hub_client():
    """`import sharnn.model` (and `import sharnn`) loads torch and numpy, not huggingface_hub, datasets or the
    trainer's stack."""
    import subprocess
    import sys

    code = ("import sys, sharnn, sharnn.model; bad = [m for m in ('huggingface_hub', 'datasets', "
            "'accelerate', 'safetensors', 'httpx2', 'train') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
