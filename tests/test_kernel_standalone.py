"""The kernel package stands alone: ``import lla_triton`` and a forward call work with the
harness out of reach.

A child interpreter starts without site processing (``-I -S``: no PYTHONPATH, no .pth
files, so no editable install of this checkout) and with sys.path cut to the standard
library, the kernels folder and the site-packages folders that hold torch and triton. A
finder at the head of sys.meta_path refuses ``lla_verify`` and records every attempt,
so a guarded ``try: import lla_verify`` inside the kernels is caught too, not only an
import that would fail. The child saves its inputs and output; this process, which has
the harness, judges the output against the float64 oracle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lla_verify.oracles.float64 import lla_forward

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

CHILD = r'''
import importlib.abc, json, sys

kernels, deps, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
stdlib = [p for p in sys.path if p and "site-packages" not in p and "dist-packages" not in p]
sys.path[:] = [kernels, *stdlib, *deps]

attempts = []


class NoHarness(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lla_verify" or name.startswith("lla_verify."):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the kernels must not need it)",
                                      name=name)
        return None


sys.meta_path.insert(0, NoHarness())
try:
    import lla_verify  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the block on lla_verify does not hold")
attempts.clear()

import torch
import lla_triton

gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
o = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1)
torch.save({"q": q, "k": k, "v": v, "o": o}, out)
print(json.dumps({"lla_triton": lla_triton.__file__, "attempts": attempts,
                  "harness_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "lla_verify")}))
'''


def _site_dirs() -> list[str]:
    """The folders that hold torch and triton, and this interpreter's site-packages folders."""
    import triton

    dirs = [str(Path(m.__file__).resolve().parents[1]) for m in (torch, triton)]
    dirs += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def test_lla_triton_imports_and_runs_without_the_harness(tmp_path):
    out = tmp_path / "forward.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, str(KERNELS), json.dumps(_site_dirs()), str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["lla_triton"]).resolve().is_relative_to(KERNELS), got["lla_triton"]
    assert got["attempts"] == [], f"lla_triton tried to import the harness: {got['attempts']}"
    assert got["harness_loaded"] == [], got["harness_loaded"]

    # the call computed LLA, not merely returned: fp32 against the float64 oracle on a
    # well-conditioned Gaussian problem (kappa ~ 1e2, fp32 u ~ 6e-8)
    t = torch.load(out)
    ref = lla_forward(*(t[n].double() for n in "qkv"), ridge_lambda=0.1)
    rel = float((t["o"].double() - ref).norm() / ref.norm())
    assert rel < 1e-4, rel
