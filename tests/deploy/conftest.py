"""Fixtures for the deployment tests: the parsed Dockerfile, K8s manifests and README.

The parsers are deliberately small: they understand the subset of Dockerfile syntax this
repository uses (line continuations, comments, ``FROM ... AS``, exec-form ``CMD``/``HEALTHCHECK``,
``ENV K=V ...``, ``COPY [--from=stage] SRC... DEST``) and fail loudly on anything else they are
asked about, so a Dockerfile change they do not understand breaks a test instead of passing it.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from bnfold.certificate import Certificate, attach

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line of the instruction's first physical line


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        if len(found) != 1:
            raise AssertionError(f"stage {self.name!r} has {len(found)} {keyword} instructions, expected exactly 1")
        return found[0]

    def env(self) -> dict[str, str]:
        """The stage's ``ENV`` variables (``K=V`` form only), later lines overriding earlier ones."""
        env: dict[str, str] = {}
        for inst in self.all("ENV"):
            for word in shlex.split(inst.args):
                key, sep, value = word.partition("=")
                if not sep:
                    raise AssertionError(f"line {inst.line}: use ENV KEY=VALUE, got {inst.args!r}")
                env[key] = value
        return env

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON argument list of ``CMD``/``ENTRYPOINT``/``HEALTHCHECK ... CMD [...]``."""
        args = self.one(keyword).args
        if keyword == "HEALTHCHECK":
            args = args[args.index(" CMD ") + len(" CMD ") :] if " CMD " in args else args.removeprefix("CMD ")
        argv = json.loads(args)
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise AssertionError(f"{keyword} must be an exec-form JSON list of strings, got {args!r}")
        return argv

    def copies(self) -> list[tuple[str | None, list[str], str]]:
        """``(from_stage or None for the build context, sources, destination)`` per ``COPY``."""
        result = []
        for inst in self.all("COPY"):
            words = shlex.split(inst.args)
            options = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            source_stage = next((o.split("=", 1)[1] for o in options if o.startswith("--from=")), None)
            result.append((source_stage, paths[:-1], paths[-1]))
        return result

    def run_commands(self) -> list[str]:
        """Every ``&&``-separated shell command of the stage's ``RUN`` instructions."""
        return [part.strip() for inst in self.all("RUN") for part in inst.args.split("&&")]


@dataclass
class Dockerfile:
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(text: str) -> Dockerfile:
    """Split a Dockerfile into stages of logical instructions."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        pending = []
        inst = Instruction(keyword.upper(), args.strip(), start)
        if inst.keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", inst.args, flags=re.IGNORECASE)
            if match is None:
                raise AssertionError(f"line {start}: cannot parse FROM {inst.args!r}")
            stages.append(Stage(base=match.group(1), name=match.group(2)))
        elif not stages:
            raise AssertionError(f"line {start}: {inst.keyword} before the first FROM")
        else:
            stages[-1].instructions.append(inst)
    if pending:
        raise AssertionError("the Dockerfile ends inside a line continuation")
    return Dockerfile(stages)


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash fenced blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def shell_commands(block: str) -> list[str]:
    """One string per command of a bash block: comments dropped, continuations joined."""
    commands: list[str] = []
    current = ""
    for raw in block.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        commands.append((current + line).strip())
        current = ""
    if current:
        raise AssertionError(f"bash block ends inside a line continuation: {current!r}")
    return commands


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``readme_command``: one test case per shell command in the README, named by its start."""
    if "readme_command" in metafunc.fixturenames:
        commands = [c for b in bash_blocks((REPO / "README.md").read_text()) for c in shell_commands(b)]
        ids = [re.sub(r"[^\w./:=-]+", "_", c)[:60] for c in commands]
        metafunc.parametrize("readme_command", commands, ids=ids)


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def readme() -> str:
    return (REPO / "README.md").read_text()


@pytest.fixture(scope="session")
def readme_commands(readme: str) -> list[str]:
    """Every shell command in the README's ```bash blocks."""
    return [command for block in bash_blocks(readme) for command in shell_commands(block)]


@pytest.fixture(scope="session")
def readme_python(readme: str) -> list[str]:
    """The README's ```python blocks."""
    return re.findall(r"^```python\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="session")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """``{file name: [documents]}`` for every ``deploy/k8s/*.yaml``."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
    }


def standin_digits_model(seed: int = 0) -> onnx.ModelProto:
    """A certified model with the digits model's signature: ``input`` [N,1,8,8] -> ``logits`` [N,10].

    Flatten + Gemm with seeded weights; its self-test output is computed in float64 numpy, so the
    service's certificate check is exercised too.
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((10, 64)).astype(np.float32) / 8
    bias = rng.standard_normal(10).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], transB=1)],
        "digits_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    x = rng.uniform(0, 16, (2, 1, 8, 8)).astype(np.float32)
    reference = x.reshape(2, 64).astype(np.float64) @ weight.T.astype(np.float64) + bias.astype(np.float64)
    attach(model, Certificate(input_name="input", output_name="logits", selftest_input=x,
                              selftest_output=reference.astype(np.float32), architecture="digits-standin",
                              input_shape=[1, 8, 8], class_labels=[str(i) for i in range(10)]))
    return model


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's ``models/`` if ``bnfold quickstart`` has filled it, else one holding the stand-in."""
    if sorted((REPO / "models" / "digits").glob("*/model.onnx")):
        return REPO / "models"
    root = tmp_path_factory.mktemp("models")
    (root / "digits" / "1").mkdir(parents=True)
    onnx.save(standin_digits_model(), root / "digits" / "1" / "model.onnx")
    return root
