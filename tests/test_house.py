"""The house rules that keep the layers apart, and the package as users install it."""
import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT

FORBIDDEN_IN_ENCODER = {"pyarrow", "ray", "webdataset", "pipeline"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, dotted name) of every import in a file; level > 0 for relative imports."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


def test_encoder_imports_no_pyarrow_ray_webdataset_or_pipeline():
    offenders = [f"{path.name}: {name}" for path in sorted((ROOT / "encoder").rglob("*.py"))
                 for level, name in _imports(path) if level == 0 and name.split(".")[0] in FORBIDDEN_IN_ENCODER]
    assert not offenders, offenders


def test_pipeline_uses_only_the_encoder_package():
    """`import encoder` / `from encoder import X` only: submodules are the encoder's own business."""
    offenders = [f"{path.name}: {name}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
                 for level, name in _imports(path) if level == 0 and name.startswith("encoder.")]
    assert not offenders, offenders


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom encoder.strokes import FIELDS\nimport pyarrow.parquet as pq\n")
    names = [name for _, name in _imports(bad)]
    assert "encoder.strokes" in names and "pyarrow.parquet" in names


def test_wheel_installed_outside_the_checkout_reads_its_presets(tmp_path):
    """Build a wheel, install it into a fresh venv outside the checkout, load presets by name.

    The fresh venv borrows this interpreter's third-party packages (torch, yaml) through a .pth
    line, so nothing is downloaded; the project itself comes only from the wheel (a plain path in a
    .pth does not run the editable install's import hook).
    """
    # What the wheel is built from, copied without git: a release tarball or a "Download ZIP" has no
    # work tree to list.
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "run_encode.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    for folder in ("encoder", "pipeline", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels,
                    src], check=True, timeout=300)
    wheel = next(wheels.glob("painterbot-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
                   check=True, timeout=300)
    code = ("import encoder; c = encoder.load_config('cpu_small'); f = encoder.load_config('fast'); "
            "print(encoder.__file__); print(c.strokes, c.size, c.group_size, f.steps)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    where, values = proc.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout's
    assert values == "200 128 50 100"  # cpu_small's and fast's values from configs/, not the dataclass defaults

