"""Build the real image from the Dockerfile with podman and check it running; ``.ci/run`` calls this.

    python tests/deploy/image_check.py [--budget-mb 460] [--wheels DIR]

Root on Debian 12 (CI's machine) with no container registry reachable. The steps, each with a
timeout, and what each proves:

1. podman, runc and debootstrap are installed with apt if missing. A private ``containers.conf``
   (``CONTAINERS_CONF``; /etc is not touched) selects runc (crun refuses this machine's hybrid
   cgroups) and sets the ulimits the sandbox allows (podman's default of 1048576 is refused).
2. A stand-in for ``python:3.11-slim`` is made or reused (``deploy/ci/stand_in_base.sh``).
3. ``podman build --format docker`` (keeps the HEALTHCHECK) of the unchanged Dockerfile: the
   build stage trains, folds and verifies, so a failing verification fails here. Build steps get
   the host network and, read-only and for the build only, the host's CA bundle; torch's CPU
   wheel comes from a local folder through the Dockerfile's ``wheels`` build context.
4. The image: its size within the budget, a numeric non-root ``USER``, the HEALTHCHECK kept, no
   build argument left in its environment.
5. The image's ``CMD`` on loopback with a read-only root file system, no capabilities and no new
   privileges (the Deployment's securityContext): ready within a deadline; a v2 and a v1 answer
   equal to onnxruntime in this process on the baked model (copied out of the container); the
   server process runs as uid 10001; ``import torch`` fails; ``podman healthcheck run`` passes and
   the same command fails against a port where nothing listens.
6. The image with another model repository mounted read-only at ``/app/models``: it serves that
   repository's model (equal to onnxruntime) and not the baked one.

Containers are removed by ID on every exit. The image stays (tagged ``localhost/bnfold:ci``), so a
second run reuses podman's layer cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bnfold.tolerance import Tolerance

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/bnfold:ci"
BASE = "docker.io/library/python:3.11-slim"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# podman's size of the image, 10^6 bytes, on the Debian stand-in base (183 MB of it): 460 on
# 2026-12-01 with the grpc requirements (408 before them). Torch or CUDA libraries would add 700+.
BUDGET_MB = 520
UID = 10001
READY_S = 120  # a loaded 2-core machine starts the server slowly
LOGITS = Tolerance(atol=1e-5, rtol=1e-4)
PROBABILITIES = Tolerance(atol=1e-6, rtol=1e-4)
T = TypeVar("T")


class CheckFailed(Exception):
    """One step found the image wrong; the message says what was expected and what was found."""


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True,
        log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a deadline; on failure raise with the command and the tail of its output."""
    try:
        if log is None:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        else:
            with log.open("w") as out:
                result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                        env=env, check=False)
            result.stdout = log.read_text()
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"{' '.join(argv[:3])} ... did not finish within {timeout:.0f} s") from exc
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + (result.stderr or "")).splitlines()[-40:])
        raise CheckFailed(f"{' '.join(argv[:4])} ... exited with {result.returncode}:\n{tail}")
    return result


class Podman:
    """The podman CLI with this run's containers.conf; every container it starts is removed on close."""

    def __init__(self, conf: Path) -> None:
        self.env = os.environ | {"CONTAINERS_CONF": str(conf)}
        self.scratch = conf.parent
        self.containers: list[str] = []

    def __call__(self, *args: str, timeout: float = 60, check: bool = True,
                 log: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], timeout, env=self.env, check=check, log=log)

    def start(self, *args: str) -> str:
        """``podman run --detach``; the ID comes from --cidfile, so a container that fails to start is removed too."""
        cidfile = self.scratch / f"container-{len(self.containers)}.id"
        try:
            self("run", "--detach", "--cidfile", str(cidfile), *args, IMAGE, timeout=120)
        finally:
            if cidfile.exists():
                self.containers.append(cidfile.read_text().strip())
        return self.containers[-1]

    def logs(self, cid: str) -> str:
        """The end of a container's stdout and stderr."""
        result = self("logs", cid, check=False)
        return (result.stdout + result.stderr)[-3000:]

    def close(self) -> None:
        for cid in reversed(self.containers):
            self("rm", "--force", "--time", "5", cid, timeout=60, check=False)
        self.containers.clear()


def write_containers_conf(folder: Path) -> Path:
    """runc and ulimits the sandbox accepts: open files at the hard limit, 32768 processes."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = folder / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    return conf


def install_podman() -> str:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if not missing:
        return "already installed"
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "podman", "runc", "debootstrap"]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    if run(install, 600, env=env, check=False).returncode != 0:
        run(["apt-get", "update", "-q"], 300, env=env)
        run(install, 600, env=env)
    return f"installed {', '.join(missing)}"


def torch_pin() -> str:
    pins = re.findall(r"torch==([\w.]+)", (REPO / "Dockerfile").read_text())
    if len(set(pins)) != 1:
        raise CheckFailed(f"expected one torch==VERSION in the Dockerfile, found {pins}")
    return pins[0]


def wheel_folder(given: Path | None) -> Path:
    """The folder holding torch's CPU wheel: --wheels, else pip's find-links (PIP_FIND_LINKS here).

    Without that wheel the build would take PyPI's torch, the multi-GB CUDA build: refuse instead.
    """
    pattern = f"torch-{torch_pin()}+cpu-cp311-*.whl"
    candidates = [given] if given else [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob(pattern)):
            return folder
    raise CheckFailed(f"no {pattern} in {', '.join(map(str, candidates))}; give its folder with --wheels DIR")


def build(podman: Podman, wheels: Path, log: Path) -> str:
    args = ["build", "--format", "docker", "--pull=never", "--network", "host",
            "--build-context", f"wheels={wheels}",
            # the CPU wheel in `wheels` wins over PyPI's torch of the same version (see the Dockerfile)
            "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple", "--tag", IMAGE]
    if HOST_CA.is_file():  # this machine's egress CA, for the build's pip only; not kept in the image
        args += ["--volume", f"{HOST_CA}:{HOST_CA}:ro"]
    podman(*args, str(REPO), timeout=1500, log=log)
    return f"log {log}"


def inspect_image(podman: Podman, budget_mb: int) -> dict[str, Any]:
    (info,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    config = info["Config"]
    size_mb = info["Size"] / 1e6
    if size_mb > budget_mb:
        raise CheckFailed(f"the image is {size_mb:.0f} MB, over the budget of {budget_mb} MB")
    uid, _, gid = str(config.get("User", "")).partition(":")
    if not (uid.isdigit() and int(uid) == UID and gid.isdigit() and int(gid) != 0):
        raise CheckFailed(f"expected USER {UID}:<non-zero gid>, got {config.get('User')!r}")
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}
    if health.get("Test", [None])[0] != "CMD":
        raise CheckFailed(f"the HEALTHCHECK was lost (build with --format docker), got {health!r}")
    leaked = [e for e in config.get("Env", []) if e.split("=")[0] in ("PIP_INDEX_URL", "PIP_FIND_LINKS",
                                                                       "TORCH_INDEX_URL", "ONNXRUNTIME")]
    if leaked:
        raise CheckFailed(f"build arguments left in the image's environment: {leaked}")
    return {"size_mb": size_mb, "healthcheck": health["Test"][1:]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def serve(podman: Podman, *args: str) -> tuple[str, str]:
    """Start the image's CMD on a free loopback port; wait until ready. Returns (container ID, URL).

    The host network, so nothing depends on podman's port forwarding; a port taken between
    choosing and binding it (the container then exits with "address already in use") is retried.
    """
    for _ in range(3):
        port = free_port()
        cid = podman.start("--network", "host", "--env", "BNFOLD_HOST=127.0.0.1", "--env", f"BNFOLD_PORT={port}",
                           *args)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_S
        while True:
            try:
                ready = request(f"{url}/v2/health/ready")[0] == 200
            except (OSError, ValueError):
                ready = False  # not listening yet
            state = json.loads(podman("inspect", "--format", "{{json .State}}", cid).stdout)
            if ready and state.get("Running"):  # still running: it did not fail to bind, say
                return cid, url
            if not state.get("Running"):
                logs = podman.logs(cid)
                if "address already in use" in logs:
                    break
                raise CheckFailed(f"the container exited with {state.get('ExitCode')} before it was ready:\n{logs}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"not ready within {READY_S} s:\n{podman.logs(cid)}")
            time.sleep(0.5)
    raise CheckFailed("three free ports were taken before the server could bind them")


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime in this process, graph optimizations off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def compare(name: str, tolerance: Tolerance, served: np.ndarray, expected: np.ndarray) -> str:
    comparison = tolerance.compare(served, expected)
    if not comparison.passed:
        raise CheckFailed(f"{name} differs from onnxruntime in this process: {comparison}")
    return f"max |diff| {float(np.max(np.abs(served - expected))):.1e}"


def infer_v2(url: str, model: str, x: np.ndarray) -> np.ndarray:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    status, answer = request(f"{url}/v2/models/{model}/infer", {"inputs": [tensor]})
    if status != 200:
        raise CheckFailed(f"v2 infer on {model}: expected 200, got {status} {answer}")
    (output,) = answer["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def baked_model(podman: Podman, cid: str, scratch: Path) -> Path:
    """The newest digits version inside the container, copied out."""
    podman("cp", f"{cid}:/app/models", str(scratch / "baked"), timeout=60)
    return max((scratch / "baked" / "digits").glob("*/model.onnx"), key=lambda p: int(p.parent.name))


def check_v2(url: str, model: Path) -> str:
    x = np.random.default_rng(0).uniform(0, 16, (3, 1, 8, 8)).astype(np.float32)
    return compare("v2 logits", LOGITS, infer_v2(url, "digits", x), reference(model, x))


def check_v1(url: str, model: Path) -> str:
    x = np.random.default_rng(1).uniform(0, 16, (2, 1, 8, 8)).astype(np.float32)
    status, answer = request(f"{url}/v1/models/digits:predict", {"instances": x.tolist()})
    if status != 200:
        raise CheckFailed(f"v1 predict: expected 200, got {status} {answer}")
    logits = reference(model, x).astype(np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    predictions = answer["predictions"]
    classes = [p["class_index"] for p in predictions]
    if classes != expected.argmax(axis=1).tolist():
        raise CheckFailed(f"v1 classes: expected {expected.argmax(axis=1).tolist()}, got {classes}")
    served = np.array([[p["probabilities"][str(k)] for k in range(10)] for p in predictions])
    return compare("v1 probabilities", PROBABILITIES, served, expected)


def check_user(podman: Podman, cid: str) -> str:
    """Real, effective, saved and file-system uid of the server process (PID 1), read from /proc."""
    status = podman("exec", cid, "python", "-c", "print(open('/proc/1/status').read())").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    if uids != [str(UID)] * 4:
        raise CheckFailed(f"expected the server to run as uid {UID}, /proc/1/status says Uid: {uids}")
    return f"uid {UID}"


def check_no_torch(podman: Podman, cid: str) -> str:
    result = podman("exec", cid, "python", "-c", "import torch", check=False)
    if result.returncode == 0 or "No module named 'torch'" not in result.stderr:
        raise CheckFailed(f"expected `import torch` to fail in the image, got {result.returncode}: {result.stderr}")
    return "No module named 'torch'"


def check_healthcheck(podman: Podman, cid: str, command: list[str]) -> str:
    podman("healthcheck", "run", cid, timeout=60)
    # The same command with nothing listening must fail, or the passing run above proves nothing.
    result = podman("exec", "--env", f"BNFOLD_PORT={free_port()}", cid, *command, check=False, timeout=60)
    if result.returncode == 0:
        raise CheckFailed("the HEALTHCHECK command passed against a port where nothing listens")
    return "passes; fails with no server"


def other_repository(root: Path) -> tuple[Path, str]:
    """A one-model repository unlike the baked one: ``input`` [N,4] -> ``output`` [N,3], Gemm."""
    rng = np.random.default_rng(7)
    weight, bias = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "weight", "bias"], ["output"], transB=1)], "mounted",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = root / "mounted" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, path)
    for folder in (root, root / "mounted", path.parent):  # readable by the image's uid 10001
        folder.chmod(0o755)
    path.chmod(0o644)
    return path, "mounted"


def check_mounted(podman: Podman, scratch: Path) -> str:
    model, name = other_repository(scratch / "other")
    _, url = serve(podman, "--volume", f"{model.parents[2]}:/app/models:ro")
    status, _ = request(f"{url}/v2/models/digits")
    if status != 404:
        raise CheckFailed(f"with another repository mounted, expected 404 for the baked digits model, got {status}")
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    return f"serves {name!r}, not digits; " + compare("mounted model", LOGITS, infer_v2(url, name, x),
                                                     reference(model, x))


@contextmanager
def terminated_on_signal() -> Iterator[None]:
    """SIGTERM/SIGHUP (CI cancelling) unwinds like an exception, so cleanup still runs."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=int, default=BUDGET_MB, help="largest image size, 10^6 bytes")
    parser.add_argument("--wheels", type=Path, help="folder with torch's CPU wheel (default: PIP_FIND_LINKS)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("image check: run as root (rootful podman with overlay storage)", file=sys.stderr)
        return 2
    rows: list[tuple[str, float, str]] = []

    def step(name: str, action: Callable[[], T], detail: Callable[[T], str] = str) -> T:
        print(f"image check: {name} ...", flush=True)
        start = time.monotonic()
        value = action()
        rows.append((name, time.monotonic() - start, detail(value)))
        return value

    total = time.monotonic()
    build_log = Path(tempfile.gettempdir()) / "bnfold-image-build.log"
    with terminated_on_signal(), tempfile.TemporaryDirectory(prefix="bnfold-image-") as tmp:
        scratch = Path(tmp)
        scratch.chmod(0o755)
        podman = Podman(write_containers_conf(scratch))
        try:
            step("podman, runc, debootstrap", install_podman)
            step("stand-in base image", lambda: run(["bash", str(REPO / "deploy/ci/stand_in_base.sh"), BASE], 900,
                                                    env=podman.env).stdout.strip().splitlines()[-1])
            wheels = wheel_folder(args.wheels)
            step("podman build", lambda: build(podman, wheels, build_log))
            image = step("image: size, USER, HEALTHCHECK, ENV", lambda: inspect_image(podman, args.budget_mb),
                         lambda i: f"{i['size_mb']:.0f} MB <= {args.budget_mb} MB")
            cid, url = step("ready, read-only root, no capabilities", lambda: serve(
                podman, "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges"),
                lambda served: served[1])
            model = baked_model(podman, cid, scratch)
            step("v2 infer = onnxruntime", lambda: check_v2(url, model))
            step("v1 predict = onnxruntime", lambda: check_v1(url, model))
            step("server process uid", lambda: check_user(podman, cid))
            step("no torch", lambda: check_no_torch(podman, cid))
            step("HEALTHCHECK", lambda: check_healthcheck(podman, cid, image["healthcheck"]))
            step("-v OTHER:/app/models:ro", lambda: check_mounted(podman, scratch))
        except CheckFailed as exc:
            print(f"image check FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            podman.close()
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'step':<{width}}  {'s':>6}  result")
    for name, seconds, detail in rows:
        print(f"{name:<{width}}  {seconds:6.1f}  {detail}")
    print(f"image check passed in {time.monotonic() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
