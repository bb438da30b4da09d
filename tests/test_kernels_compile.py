"""The kernels through the GPU's own compile path, on a machine without a GPU.

The other tests run the Triton kernels under TRITON_INTERPRET=1, which never lowers them: a type or
lowering error would first show on the GPU machine. ``benchmarks/compile_sm90.py`` compiles every
kernel variant the renderer launches (each tile, loss, walked and binned, one and two binning levels)
to SASS for an H100 with the installed Triton and its bundled ptxas.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline_samples import REPO


def test_every_kernel_compiles_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip(f"Triton {triton.__version__} here has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_sm90.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "prepare and fused Adam step compile for sm_90" in proc.stdout
