"""`ditpass generate` as a user runs it, for tests: the real command in one process or under torchrun.

    proc = run_generate(tmp_path / "one", "--use_cfg_parallel", nproc=2)   # a CompletedProcess
    images = saved_images(tmp_path / "one")                               # what it wrote, as int16 arrays
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["ENV", "run_generate", "saved_images"]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_generate(out_dir, *flags, nproc: int = 1, steps: int = 8, timeout: float = 600, warnings: bool = False):
    """``ditpass generate --prompt 3 7 --num_inference_steps <steps> --output_dir <out_dir> <flags>``;
    ``warnings=True``: Python's warnings are not silenced (a test of what a user's terminal shows)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "ditpass", "generate", "--prompt", "3", "7", "--num_inference_steps", str(steps),
                      "--output_dir", str(out_dir), *flags]
    env = {k: v for k, v in ENV.items() if not (warnings and k == "PYTHONWARNINGS")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def saved_images(out_dir) -> list:
    """The images of the last run in ``out_dir`` (its ``last_run.json``), as int16 arrays."""
    import numpy as np
    from PIL import Image

    files = json.loads((out_dir / "last_run.json").read_text())["files"]
    return [np.asarray(Image.open(f), dtype=np.int16) for f in files]
