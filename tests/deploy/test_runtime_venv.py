"""The Docker image's runtime stage, performed without Docker in a fresh virtual environment.

There is no Docker engine in CI, so this test replays the runtime stage of the Dockerfile:
its ``COPY`` instructions into a scratch directory standing in for the image's file system, its
``pip install`` commands in a new ``python -m venv`` (no system site-packages), its ``ENV`` lines
as the server's whole environment, its ``CMD`` as the start command and its ``HEALTHCHECK`` as the
readiness wait. It then sends real inference requests and compares the answers with onnxruntime.

What it verifies: the runtime requirements install and suffice (torch is absent and the service
still starts), the wheel the build stage builds contains the service, the ENV/CMD/HEALTHCHECK
start and probe a working server, and the baked model repository serves correct numbers.
What it does not: the image build itself, the base image's OS packages, the non-root user
(``groupadd``/``useradd``/``USER`` are skipped), and the build stage's training (the model
repository is the repository's ``models/`` or a stand-in with the digits model's signature).
pip runs with its download cache (the Dockerfile passes ``--no-cache-dir``) and this machine's
own package sources, not the ``wheels`` mount. The stage's ``ARG`` defaults are the environment of
its shell commands (the ``ONNXRUNTIME`` check and the requirements ``sed``), as in a default build.
tests/deploy/image_check.py builds and runs the real image with podman (in .ci/run).
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.tolerance import Tolerance

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Shell commands of the runtime stage that concern the OS, not Python: not replayed (see above).
SKIPPED_COMMANDS = ("groupadd", "useradd")
# The mount that gives pip a folder of local wheels; the replay uses this machine's pip sources.
WHEELS_MOUNT = "--mount=type=bind,from=wheels,target=/wheels"


@dataclass
class Image:
    """The replayed runtime stage: its file system root, venv, environment and commands."""

    root: Path  # stands in for "/" of the image
    venv: Path
    workdir: Path
    env: dict[str, str]
    cmd: list[str]
    healthcheck: list[str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def argv(self, command: list[str]) -> list[str]:
        """An exec-form command with the image's ``python`` resolved to the venv's."""
        assert command[0] == "python", command
        return [self.python, *command[1:]]


def in_root(root: Path, path: str, workdir: str = "/") -> Path:
    absolute = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
    return root / absolute.lstrip("/")


def copy_into(source: Path, dest: Path, dest_is_dir: bool) -> None:
    target = dest / source.name if dest_is_dir and source.is_file() else dest
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def build_stage_outputs(dockerfile: Any, scratch: Path, models: Path) -> Path:
    """The build stage's file system with the two things the runtime stage takes from it.

    ``/build/wheels``: the project wheel, built by pip from exactly the files the build stage
    copies in. ``/build/models``: ``models`` (training is not replayed; see the module docstring).
    """
    build = dockerfile.stage("build")
    root = scratch / "build-root"
    workdir = build.one("WORKDIR").args
    for origin, sources, dest in build.copies():
        assert origin is None, f"the build stage copies from {origin!r}; only the build context is replayed"
        for src in sources:
            copy_into(REPO / src, in_root(root, dest, workdir), dest.endswith("/"))
    wheels = in_root(root, "/build/wheels")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(wheels), str(in_root(root, workdir))],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"building the bnfold wheel failed:\n{result.stdout}\n{result.stderr}"
    shutil.copytree(models, in_root(root, "/build/models"))
    return root


def replay_runtime_stage(dockerfile: Any, scratch: Path, build_root: Path) -> Image:
    stage = dockerfile.stage("runtime")
    assert stage.base.startswith("python:3.11"), stage.base
    root = scratch / "runtime-root"
    venv = scratch / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    workdir = "/"
    copies = iter(stage.copies())  # parsed COPY instructions, in the order they appear
    build_args: dict[str, str] = {}
    for inst in stage.instructions:
        if inst.keyword == "WORKDIR":
            workdir = inst.args
            in_root(root, workdir).mkdir(parents=True, exist_ok=True)
        elif inst.keyword == "COPY":
            origin, sources, dest = next(copies)
            assert origin in (None, "build"), origin
            for src in sources:
                source = REPO / src if origin is None else in_root(build_root, src)
                copy_into(source, in_root(root, dest, workdir), dest.endswith("/"))
        elif inst.keyword == "ARG":
            name, _, default = inst.args.partition("=")
            build_args[name] = default
        elif inst.keyword == "RUN":
            shell = inst.args.removeprefix(f"{WHEELS_MOUNT} ")
            for command in (part.strip() for part in shell.split("&&")):
                run_command(command, root, workdir, venv, build_args)
    env = {k: str(in_root(root, v)) if v.startswith("/") else v for k, v in stage.env().items()}
    return Image(root=root, venv=venv, workdir=in_root(root, workdir), env=env,
                 cmd=stage.exec_form("CMD"), healthcheck=stage.exec_form("HEALTHCHECK"))


def run_command(command: str, root: Path, workdir: str, venv: Path, build_args: dict[str, str]) -> None:
    """Replay one ``RUN`` shell command: pip installs into the venv, ``rm`` and ``sed -i`` in the
    scratch root, the ``ONNXRUNTIME`` check in bash; ``build_args`` are the stage's ``ARG`` defaults."""
    if command.startswith("case "):
        result = subprocess.run(["bash", "-c", command], env={"PATH": "/usr/bin:/bin", **build_args},
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{command!r} failed with the ARG defaults {build_args}: {result.stderr}"
        return
    words = shlex.split(command)
    if words[:2] == ["sed", "-i"] and len(words) == 4 and words[3].startswith("/"):
        target = in_root(root, words[3], workdir)
        subprocess.run(["sed", "-i", expand(words[2], build_args), str(target)], check=True, timeout=30)
    elif words[:2] == ["pip", "install"]:
        args: list[str] = []
        for word in words[2:]:
            if word == "--no-cache-dir":
                continue  # keep pip's download cache: this test runs often
            if word.startswith("/"):
                matches = sorted(glob.glob(str(in_root(root, word))))
                assert matches, f"{command!r}: nothing matches {word}"
                args.extend(matches)
            else:
                args.append(word)
        result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stdout}\n{result.stderr}"
    elif words[:2] == ["rm", "-rf"]:
        for path in words[2:]:
            shutil.rmtree(in_root(root, path, workdir), ignore_errors=True)
    else:
        assert words[0] in SKIPPED_COMMANDS, f"the runtime stage runs {command!r}, which this test cannot replay"


def expand(text: str, args: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by the ARG defaults, as the build's shell expands them."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: args[m.group(1) or m.group(2)], text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(image: Image, port: int) -> dict[str, str]:
    """The container's environment: the image's ENV only (nothing leaks in from the test process)."""
    env = {"PATH": f"{image.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(image.workdir)}
    env |= image.env
    env["BNFOLD_PORT"] = str(port)  # the image's 8000 may be taken on this machine
    return env


def healthcheck(image: Image, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(image.argv(image.healthcheck), env=env, cwd=image.workdir, capture_output=True,
                          text=True, timeout=10, check=False)


@pytest.fixture(scope="module")
def image(dockerfile: Any, digits_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Image:
    scratch = tmp_path_factory.mktemp("image")
    build_root = build_stage_outputs(dockerfile, scratch, digits_repository)
    return replay_runtime_stage(dockerfile, scratch, build_root)


@pytest.fixture(scope="module")
def server(image: Image) -> Iterator[str]:
    """Start the image's CMD; wait until its HEALTHCHECK passes; yield the base URL."""
    port = free_port()
    env = server_env(image, port)
    log = image.root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(image.argv(image.cmd), env=env, cwd=image.workdir, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # a loaded 2-core machine starts slowly
        while healthcheck(image, env).returncode != 0:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"HEALTHCHECK did not pass within 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def reference_logits(model: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def newest_model(repository: Path, name: str = "digits") -> Path:
    return max((repository / name).glob("*/model.onnx"), key=lambda p: int(p.parent.name))


def test_runtime_venv_has_no_torch(image: Image) -> None:
    result = subprocess.run([image.python, "-c", "import torch"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"}, cwd=image.workdir, check=False)
    assert result.returncode != 0
    assert "No module named 'torch'" in result.stderr, result.stderr


def test_service_comes_from_the_installed_wheel(image: Image) -> None:
    code = "import service, bnfold.certificate; print(service.__file__)"
    result = subprocess.run([image.python, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"}, cwd=image.workdir, check=True)
    assert Path(result.stdout.strip()).is_relative_to(image.venv), result.stdout


def test_healthcheck_fails_without_a_server(image: Image) -> None:
    result = healthcheck(image, server_env(image, free_port()))
    assert result.returncode != 0, "the HEALTHCHECK passed with nothing listening"


def test_v2_infer_matches_onnxruntime(server: str, image: Image) -> None:
    status, metadata = request(f"{server}/v2/models/digits")
    assert status == 200, metadata
    (spec,) = metadata["inputs"]
    assert (spec["name"], spec["datatype"], spec["shape"]) == ("input", "FP32", [-1, 1, 8, 8])
    x = np.random.default_rng(0).uniform(0, 16, (3, 1, 8, 8)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    status, answer = request(f"{server}/v2/models/digits/infer", body)
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [3, 10])
    served = np.asarray(output["data"], dtype=np.float32).reshape(3, 10)
    expected = reference_logits(newest_model(Path(image.env["BNFOLD_MODEL_REPOSITORY"])), x)
    comparison = Tolerance(atol=1e-5, rtol=1e-4).compare(served, expected)
    assert comparison.passed, comparison


def test_v1_predict_matches_onnxruntime(server: str, image: Image) -> None:
    x = np.random.default_rng(1).uniform(0, 16, (2, 1, 8, 8)).astype(np.float32)
    status, answer = request(f"{server}/v1/models/digits:predict", {"instances": x.tolist()})
    assert status == 200, answer
    logits = reference_logits(newest_model(Path(image.env["BNFOLD_MODEL_REPOSITORY"])), x).astype(np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    predictions = answer["predictions"]
    assert [p["class_index"] for p in predictions] == expected.argmax(axis=1).tolist()
    assert [p["label"] for p in predictions] == [str(k) for k in expected.argmax(axis=1)]
    served = np.array([[p["probabilities"][str(k)] for k in range(10)] for p in predictions])
    comparison = Tolerance(atol=1e-6, rtol=1e-4).compare(served, expected)
    assert comparison.passed, comparison


def test_server_environment_is_the_images(image: Image) -> None:
    assert image.env["BNFOLD_HOST"] == "0.0.0.0"
    assert Path(image.env["BNFOLD_MODEL_REPOSITORY"]).is_relative_to(image.root)
    assert (Path(image.env["BNFOLD_MODEL_REPOSITORY"]) / "digits").is_dir()


def test_readme_curl_examples_answer(server: str, readme_commands: list[str]) -> None:
    """Run every curl command of the README against the server (its port substituted)."""
    curls = [shlex.split(c) for c in readme_commands if c.startswith("curl ")]
    assert len(curls) >= 5, curls
    for argv in curls:
        argv = [w.replace("localhost:8000", server.removeprefix("http://")) for w in argv]
        result = subprocess.run([*argv, "--fail-with-body"], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{shlex.join(argv)} -> {result.returncode}: {result.stdout}{result.stderr}"
        if argv[-1].endswith("/metrics"):
            assert "# TYPE" in result.stdout
            continue
        answer = json.loads(result.stdout)
        url = next(w for w in argv if w.startswith("127.0.0.1:"))
        if url.endswith("/infer"):
            assert answer["outputs"][0]["shape"] == [1, 10], answer
        elif url.endswith(":predict"):
            assert len(answer["predictions"]) == 1, answer


def test_readme_tritonclient_example_runs(server: str, readme_python: list[str]) -> None:
    """The README's tritonclient example, run as written (host:port substituted) by a separate client."""
    (example,) = readme_python
    code = example.replace('"localhost:8000"', repr(server.removeprefix("http://")))
    assert code != example
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert len(printed) == 2 and all(re.fullmatch(r"(true|predicted): +\[\d( \d){7}\]", line) for line in printed), \
        printed  # the true and the predicted digit of each of 8 images
