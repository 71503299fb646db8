"""The kernel packages stand alone: ``import lla_triton`` / ``import parallax_triton`` and a
forward call work with the harness out of reach.

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
from lla_verify.oracles.parallax import parallax_forward

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

import importlib
import torch

package = sys.argv[4]
mod = importlib.import_module(package)
gen = torch.Generator().manual_seed(0)
q, k, v, r = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(4))
if package == "lla_triton":
    o = mod.lla_attention(q, k, v, ridge_lambda=0.1)
else:
    o = mod.parallax_attention(q, k, v, r)
torch.save({"q": q, "k": k, "v": v, "r": r, "o": o}, out)
print(json.dumps({"module": mod.__file__, "attempts": attempts,
                  "harness_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "lla_verify")}))
'''


def _site_dirs() -> list[str]:
    """The folders that hold torch and triton, and this interpreter's site-packages folders."""
    import triton

    dirs = [str(Path(m.__file__).resolve().parents[1]) for m in (torch, triton)]
    dirs += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _run_child(package: str, tmp_path) -> dict:
    """Import ``package`` and run one forward in the harness-free child; its saved tensors."""
    out = tmp_path / "forward.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, str(KERNELS), json.dumps(_site_dirs()), str(out),
                        package], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["module"]).resolve().is_relative_to(KERNELS / package), got["module"]
    assert got["attempts"] == [], f"{package} tried to import the harness: {got['attempts']}"
    assert got["harness_loaded"] == [], got["harness_loaded"]
    return torch.load(out)


def test_lla_triton_imports_and_runs_without_the_harness(tmp_path):
    t = _run_child("lla_triton", tmp_path)
    # the call computed LLA, not merely returned: fp32 against the float64 oracle on a
    # well-conditioned Gaussian problem (kappa ~ 1e2, fp32 u ~ 6e-8)
    ref = lla_forward(*(t[n].double() for n in "qkv"), ridge_lambda=0.1)
    rel = float((t["o"].double() - ref).norm() / ref.norm())
    assert rel < 1e-4, rel


def test_parallax_triton_imports_and_runs_without_the_harness(tmp_path):
    t = _run_child("parallax_triton", tmp_path)
    # the call computed Parallax: fp32 against the float64 oracle on Gaussian inputs
    # (the kernel's error there is ~1e-6 relative, tests/test_kernel_parallax.py)
    ref = parallax_forward(*(t[n].double() for n in "qkvr"))
    rel = float((t["o"].double() - ref).norm() / ref.norm())
    assert rel < 1e-4, rel
