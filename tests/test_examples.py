"""The quickstart example runs end to end and learns (the README points users at it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_learns():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # CPU: backend "auto" is the torch path, no interpreter needed
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out.stdout)]
    acc = float(re.search(r"held-out accuracy .*?: ([0-9.]+)", out.stdout).group(1))
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert acc > 0.9  # chance is 0.05
