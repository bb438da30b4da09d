"""The house rules that keep the layers apart, and the package as users install it."""
import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


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


def test_every_function_of_the_fit_is_under_50_lines():
    """encoder/fit.py reads as a schedule of phases: a function that outgrows a screen is split, not grown."""
    tree = ast.parse((ROOT / "encoder" / "fit.py").read_text(encoding="utf-8"))
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 50]
    assert not long, long


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



# -- one owner of the output folder, the writer seam, the backends in their own module ----------------------
# Names of files in the output folder: only pipeline/output_folder.py spells them.
FOLDER_NAMES = ("__painterbot__", "_stats.json", ".incomplete", "settings.json", "summary.json", "driver.lock", ".tmp")
# img2dataset writes its own {id}_stats.json beside each input tar: a name of the input's folder, not the output's.
INPUT_SIDE = {("demo.py", "_stats.json"), ("shards.py", "_stats.json"), ("upstream.py", "_stats.json")}


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in a file but docstrings and other bare strings (f-string parts too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare]


def _defined(path: Path, kind) -> set[str]:
    return {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(node, kind)}


def test_only_the_output_folder_module_spells_the_folder_s_names():
    offenders = [f"{path.name}:{line}: {text!r}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
                 if path.name != "output_folder.py" for line, text in _strings(path)
                 for name in FOLDER_NAMES if name in text and (path.name, name) not in INPUT_SIDE]
    assert not offenders, offenders


def test_the_output_folder_module_stands_on_storage_alone():
    """Everything that touches the folder imports it; it imports no other pipeline module, so no cycle can form."""
    relative = {name for level, name in _imports(ROOT / "pipeline" / "output_folder.py") if level}
    assert relative <= {"", "storage"}, relative


def test_readers_of_a_run_do_not_import_the_driver_or_the_backends():
    """The gallery and the loaders read a folder; they need neither Ray nor the run's machinery."""
    offenders = [f"{name}: {module}" for name in ("gallery.py", "columns.py", "dataset.py", "stream.py")
                 for level, module in _imports(ROOT / "pipeline" / name)
                 if module.split(".")[-1] in ("driver", "backends") or module.split(".")[0] == "ray"]
    assert not offenders, offenders


def test_the_backends_live_in_their_own_module():
    assert not {name for name in _defined(ROOT / "pipeline" / "driver.py", ast.ClassDef) if name.endswith("Backend")}
    assert {"LocalBackend", "RayBackend"} <= _defined(ROOT / "pipeline" / "backends.py", ast.ClassDef)


def test_the_worker_opens_its_output_through_the_writer_seam():
    """ShardEncoder takes a writer_factory (writer.ShardOutputFactory); it never builds a ShardWriter itself."""
    calls = [node.lineno for node in ast.walk(ast.parse((ROOT / "pipeline" / "worker.py").read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ShardWriter"]
    assert not calls, calls


def test_the_checkers_see_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Writes __painterbot__/summary.json."""\nname = f"{sid}_stats.json"\nclass RayBackend: pass\n')
    assert [text for _, text in _strings(bad)] == ["_stats.json"]  # the f-string's part, not the docstring
    assert _defined(bad, ast.ClassDef) == {"RayBackend"}
