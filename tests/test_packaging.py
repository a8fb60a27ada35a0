"""A normal (non-editable) install puts passes/ and models/ under ditpass, and nothing else top-level."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_normal_install_layout(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), ROOT], check=True, cwd=tmp_path)
    top = {p for p in os.listdir(target) if not p.endswith((".dist-info", ".egg-info")) and p not in ("bin", "__pycache__")}
    assert top == {"ditpass"}
    out = subprocess.run([sys.executable, "-c", "import ditpass.passes.sequence_parallel, ditpass.models.zoo as z;"
                          "import ditpass; print(ditpass.__file__, len(z.NAMES))"],
                         env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    path, n = out.stdout.split()
    assert path.startswith(str(target)) and n == "12"
