"""Every command the README shows is checked against the real thing it names.

Each shell command in a ```bash block is split at ``&&`` and every part goes to the checker for its
program: ``bnfold`` commands parse with the real argparse parser, ``curl`` examples hit real routes
of the app with bodies that fit the digits model, ``docker``/``kubectl`` arguments agree with the
Dockerfile and the manifests, ``pip`` extras exist in pyproject.toml. A program without a checker
fails the test, so a new kind of command cannot slip in unchecked. tests/deploy/test_runtime_venv.py
also runs the curl and tritonclient examples against a real server.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import tomllib
from starlette.routing import Match

REPO = Path(__file__).resolve().parents[2]
DIGITS = {"input": ("FP32", [-1, 1, 8, 8]), "output": "logits"}


def split_and(command: str) -> list[list[str]]:
    """``a && b`` -> ``[[a words], [b words]]`` (quotes respected)."""
    words = shlex.split(command)
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    assert all(parts), f"empty command in {command!r}"
    return parts


# --- checkers: one per program; each raises AssertionError (or skips) with what is wrong ----------


def check_bnfold(argv: list[str], ctx: Context) -> None:
    sub = next((a for a in argv[1:] if not a.startswith("-")), None)
    assert sub is not None, argv
    if importlib.util.find_spec(f"bnfold.cli.{sub}") is None:
        pytest.skip(f"bnfold {sub} is not merged yet")
    from bnfold.cli import build_parser

    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        if exc.code == 0 and "--help" in argv:
            return
        raise AssertionError(f"bnfold rejects {shlex.join(argv)} (exit {exc.code})") from None
    assert args.command == sub


def check_curl(argv: list[str], ctx: Context) -> None:
    method, url, body, headers = "GET", None, None, []
    words = iter(argv[1:])
    for word in words:
        if word == "-s":
            continue
        if word == "-X":
            method = next(words)
        elif word == "-H":
            headers.append(next(words))
        elif word == "-d":
            body = next(words)
            method = "POST" if method == "GET" else method
        else:
            assert url is None and not word.startswith("-"), f"unexpected curl argument {word!r}"
            url = word
    assert url is not None and url.startswith("localhost:8000/"), url
    path = url.removeprefix("localhost:8000")
    assert ctx.route_matches(method, path), f"{method} {path} is not a route of the service"
    if body is None:
        return
    assert "Content-Type: application/json" in headers, headers
    payload = json.loads(body)
    if path.endswith("/infer"):
        check_v2_body(payload, ctx.model_signature())
    elif path.endswith(":predict"):
        check_v1_body(payload, ctx.model_signature())
    else:
        raise AssertionError(f"no body check for {path}")


def check_v2_body(payload: dict[str, Any], signature: dict[str, tuple[str, list[int]]]) -> None:
    for tensor in payload["inputs"]:
        datatype, shape = signature[tensor["name"]]
        assert tensor["datatype"] == datatype, (tensor["datatype"], datatype)
        assert fits(tensor["shape"], shape), (tensor["shape"], shape)
        assert len(tensor["data"]) == math.prod(tensor["shape"]), (len(tensor["data"]), tensor["shape"])
    assert sorted(t["name"] for t in payload["inputs"]) == sorted(signature)


def check_v1_body(payload: dict[str, Any], signature: dict[str, tuple[str, list[int]]]) -> None:
    import numpy as np

    ((_, shape),) = signature.values()
    instances = np.asarray(payload["instances"], dtype=np.float32)
    assert fits(list(instances.shape), shape), (instances.shape, shape)


def fits(shape: list[int], spec: list[int]) -> bool:
    return len(shape) == len(spec) and all(s == d or d == -1 for s, d in zip(shape, spec, strict=True))


def check_docker(argv: list[str], ctx: Context) -> None:
    from bnfold import __version__

    image = f"bnfold:{__version__}"
    if argv[1] == "build":
        assert argv[2:] == ["-t", image, "."], argv
        return
    assert argv[1] == "run", argv
    assert argv[-1] == image, argv
    words = iter(argv[2:-1])
    runtime = ctx.dockerfile.final
    for word in words:
        if word == "--rm":
            continue
        value = next(words)
        if word == "-p":
            assert value.split(":")[1] == runtime.one("EXPOSE").args, value
        elif word == "-v":
            assert f'["{value.split(":")[1]}"]' == runtime.one("VOLUME").args, value
        elif word == "-e":
            assert value.split("=")[0] in ctx.setting_names, value
        else:
            raise AssertionError(f"unexpected docker run option {word!r}")


def check_kubectl(argv: list[str], ctx: Context) -> None:
    docs = [doc for docs in ctx.manifests.values() for doc in docs]
    if argv[1] == "apply":
        files = [argv[i + 1] for i, w in enumerate(argv) if w == "-f"]
        assert files and all((REPO / f).is_file() and f.startswith("deploy/k8s/") for f in files), files
        assert len(files) * 2 + 2 == len(argv), argv
    elif argv[1:4] == ["create", "secret", "generic"]:
        name, literal = argv[4], argv[5]
        key = literal.removeprefix("--from-literal=").split("=")[0]
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for doc in docs if doc["kind"] == "Deployment"
            for c in doc["spec"]["template"]["spec"]["containers"] for e in c["env"] if "valueFrom" in e
        ]
        assert {"name": name, "key": key, "optional": True} in refs, refs
    elif argv[1] == "port-forward":
        kind, name = argv[2].split("/")
        local, remote = argv[3].split(":")
        services = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name]
        assert kind == "service" and services, argv
        assert int(remote) in [p["port"] for p in services[0]["spec"]["ports"]], argv
        assert local == "8000", argv  # the README's curl examples use localhost:8000
    else:
        raise AssertionError(f"no check for kubectl {argv[1]}")


def check_pip(argv: list[str], ctx: Context) -> None:
    assert argv[1] == "install", argv
    if argv[2].startswith("torch=="):
        assert argv[3:] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"], argv
        return
    assert argv[2] == "-e" and len(argv) == 4, argv
    match = re.fullmatch(r"\.\[([\w,-]+)\]", argv[3])
    assert match, argv
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(match.group(1).split(",")) <= set(extras), (match.group(1), sorted(extras))


def check_pytest(argv: list[str], ctx: Context) -> None:
    if len(argv) == 1:
        return
    assert argv[1:3] == ["-m", "not slow"] and len(argv) == 3, argv
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers), markers


def check_python(argv: list[str], ctx: Context) -> None:
    if argv[1:] == ["-m", "venv", ".venv"]:
        return
    assert len(argv) == 2 and (REPO / argv[1]).is_file(), argv


def check_torchrun(argv: list[str], ctx: Context) -> None:
    """torchrun's own parser takes the launcher options; what it launches must be ``-m bnfold ...``."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv[1:])
    assert args.module and args.training_script == "bnfold", argv
    check_bnfold(["bnfold", *args.training_script_args], ctx)


def check_source(argv: list[str], ctx: Context) -> None:
    assert argv == [".", ".venv/bin/activate"], argv


def check_script(argv: list[str], ctx: Context) -> None:
    assert len(argv) == 1 and os.access(REPO / argv[0], os.X_OK), argv


CHECKERS: dict[str, Callable[[list[str], Context], None]] = {
    "bnfold": check_bnfold,
    "curl": check_curl,
    "docker": check_docker,
    "kubectl": check_kubectl,
    "pip": check_pip,
    "pytest": check_pytest,
    "python": check_python,
    "python3": check_python,
    ".": check_source,
    ".ci/run": check_script,
    "torchrun": check_torchrun,
}


class Context:
    """What the checkers compare against: the app's routes, the model, the Dockerfile, the manifests."""

    def __init__(self, dockerfile: Any, manifests: dict[str, list[dict[str, Any]]], models: Path) -> None:
        from service.config import Settings

        self.dockerfile = dockerfile
        self.manifests = manifests
        self.models = models
        self.setting_names = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}

    def route_matches(self, method: str, path: str) -> bool:
        from service.config import Settings
        from service.main import create_app

        app = create_app(Settings(model_repository=self.models))
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        return any(route.matches(scope)[0] == Match.FULL for route in app.routes)

    def model_signature(self) -> dict[str, tuple[str, list[int]]]:
        path = max((self.models / "digits").glob("*/model.onnx"), key=lambda p: int(p.parent.name))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        types = {"tensor(float)": "FP32"}
        return {
            i.name: (types[i.type], [d if isinstance(d, int) else -1 for d in i.shape]) for i in session.get_inputs()
        }


@pytest.fixture(scope="module")
def context(dockerfile: Any, manifests: dict[str, list[dict[str, Any]]], digits_repository: Path) -> Context:
    return Context(dockerfile, manifests, digits_repository)


def test_readme_command(readme_command: str, context: Context) -> None:
    for argv in split_and(readme_command):
        checker = CHECKERS.get(argv[0])
        assert checker is not None, f"no test checks {argv[0]!r} commands; add a checker to {__file__}"
        checker(argv, context)


def test_inline_bnfold_commands_parse(readme: str, context: Context, capsys: pytest.CaptureFixture[str]) -> None:
    """`bnfold ...` in running text (outside the bash blocks) is a command too."""
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.MULTILINE | re.DOTALL)
    inline = re.findall(r"`(bnfold [^`]+)`", prose)
    assert len(inline) >= 3, inline
    for command in inline:
        argv = shlex.split(command)
        if len(argv) == 2:  # names a command ("`bnfold fold` writes nothing unless ...")
            assert importlib.util.find_spec(f"bnfold.cli.{argv[1]}") is not None, command
        else:
            check_bnfold(argv, context)
    capsys.readouterr()  # --help output


def marked_block(readme: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```\n<!-- /{marker} -->", readme, flags=re.DOTALL)
    assert match, f"README.md has no ```bash block between <!-- {marker} --> markers"
    return match.group(1)


def test_test_command_is_what_ci_runs(readme: str) -> None:
    """Run .ci/run's own extraction line and compare with the README's test-command block."""
    ci = (REPO / ".ci" / "run").read_text()
    extraction = next(line for line in ci.splitlines() if line.startswith("cmd=$(awk"))
    result = subprocess.run(["bash", "-c", f'{extraction}\nprintf %s "$cmd"'], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=30)
    assert result.stdout == marked_block(readme, "test-command")
    assert result.stdout.endswith('pip install -e ".[dev]" && pytest')


def test_quickstart_command_installs_like_the_test_command_then_runs_quickstart(readme: str) -> None:
    quickstart = marked_block(readme, "quickstart-command")
    test = marked_block(readme, "test-command")
    assert quickstart == test.replace('".[dev]" && pytest', '".[torch,serve]" && bnfold quickstart')


def test_configuration_table_is_the_settings(readme: str) -> None:
    from service.config import Settings

    rows = dict(re.findall(r"^\| `(BNFOLD_\w+)` \| ([^|]+) \|", readme, flags=re.MULTILINE))
    assert sorted(rows) == sorted(f"BNFOLD_{name.upper()}" for name in Settings.model_fields)
    for name, info in Settings.model_fields.items():
        shown = rows[f"BNFOLD_{name.upper()}"].strip().strip("`")
        default = info.default
        if default is None:
            assert shown == "unset", (name, shown)
        elif isinstance(default, bool):
            assert shown == str(default).lower(), (name, shown)
        elif isinstance(default, int | float):
            assert float(shown) == default, (name, shown, default)
        else:
            assert shown == str(default), (name, shown, default)


def test_relative_links_resolve(readme: str) -> None:
    links = re.findall(r"\]\((?!https?://)([^)#]+)\)", readme)
    assert "docs/pipeline.svg" in links
    missing = [link for link in links if not (REPO / link).exists()]
    pending = "benchmarks/README.md"  # written by the benchmarks work, which may land after this test
    assert [link for link in missing if link != pending] == []
    if pending in missing:
        pytest.skip(f"{pending} is not written yet")


def test_python_examples_use_the_digits_model(readme_python: list[str]) -> None:
    (example,) = readme_python
    compile(example, "README.md", "exec")
    assert 'InferInput("input", ' in example and '"FP32"' in example
    assert 'client.infer("digits"' in example and 'InferRequestedOutput("logits")' in example
    # real digit images, as the model was trained on them (raw 0-16 pixels), not noise
    assert "load_digits()" in example and "random" not in example
    assert "digits.images[-8:, None].astype(np.float32)" in example  # (8, 1, 8, 8)
    assert 'print("true:     ", digits.target[-8:])' in example and 'print("predicted:", ' in example
    assert DIGITS["input"][1][1:] == [1, 8, 8]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_tritonclient_example_against_a_real_server(readme: str, readme_python: list[str], tmp_path: Path) -> None:
    """Run the README's tritonclient example, as written (port substituted), against ``python -m service``
    serving the digits model this repository ships; it prints what the README says it prints."""
    import sys
    import time
    import urllib.request

    pytest.importorskip("tritonclient.http")
    (example,) = readme_python
    models = REPO / "models"
    if not (models / "digits" / "1" / "model.onnx").is_file():
        pytest.skip("models/digits/1/model.onnx is not in this checkout")
    repo = tmp_path / "models"
    (repo / "digits" / "1").mkdir(parents=True)
    (repo / "digits" / "1" / "model.onnx").write_bytes((models / "digits" / "1" / "model.onnx").read_bytes())
    port = _free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repo), "BNFOLD_PORT": str(port), "BNFOLD_HOST": "127.0.0.1",
           "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the server exited: {server.communicate()[1][-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server was not ready within 180 s"
            time.sleep(0.5)
        code = example.replace('"localhost:8000"', repr(f"127.0.0.1:{port}"))
        assert code != example
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert done.returncode == 0, done.stderr
    shown = re.search(r"```python\n.*?```\n\n.*?```text\n(.*?)```", readme, flags=re.DOTALL)
    assert shown is not None, "README: no ```text block with the example's output after it"
    assert done.stdout == shown.group(1)


def test_pipeline_figure_is_drawn_by_the_committed_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_pipeline_figure", REPO / "docs" / "make_pipeline_figure.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.draw(tmp_path / "pipeline.svg")
    drawn = (tmp_path / "pipeline.svg").read_text()
    committed = (REPO / "docs" / "pipeline.svg").read_text()
    for stage in ("train", "fold", "verify", "export", "serve"):
        assert f">{stage}<" in drawn and f">{stage}<" in committed, stage
