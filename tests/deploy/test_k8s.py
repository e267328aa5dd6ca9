"""deploy/k8s/*.yaml: schema validation and agreement with the image and the service.

Core kinds (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget) are validated by
kubernetes-validate against the Kubernetes OpenAPI schemas it ships (offline, strict: unknown fields
are errors). KServe's ServingRuntime/InferenceService are CRDs those schemas lack; they are validated
against tests/deploy/kserve_schema.json, our own schema of the fields we use, whose containers, env
and resources reuse the core Kubernetes definitions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"  # oldest release the manifests target; schemas are the latest <= this
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}


def find(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    found = [doc for docs in manifests.values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def kserve_validator(kind: str) -> jsonschema.Draft202012Validator:
    """A validator for ``kind`` whose ``/api/_definitions.json`` refs resolve to kubernetes-validate's schemas."""
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs_path = schemas / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json"
    definitions = json.loads(defs_path.read_text())
    ours = json.loads((Path(__file__).parent / "kserve_schema.json").read_text())
    registry: Registry[Any] = Registry().with_resources(
        [(definitions["$id"], Resource.from_contents(definitions)), (ours["$id"], Resource.from_contents(ours))]
    )
    return jsonschema.Draft202012Validator({"$ref": f"{ours['$id']}#/$defs/{kind}"}, registry=registry)


def all_docs(manifests: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, docs in manifests.items() for doc in docs]


def test_every_manifest_is_a_kind_we_validate(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kinds = sorted(doc["kind"] for _, doc in all_docs(manifests))
    assert set(kinds) <= CORE_KINDS | KSERVE_KINDS, kinds
    assert sorted(kinds) == sorted(CORE_KINDS | KSERVE_KINDS)  # each exactly once


@pytest.mark.parametrize("kind", sorted(CORE_KINDS))
def test_core_kind_validates_strictly(manifests: dict[str, list[dict[str, Any]]], kind: str) -> None:
    kubernetes_validate.validate(find(manifests, kind), K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(KSERVE_KINDS))
def test_kserve_kind_validates_against_our_schema(manifests: dict[str, list[dict[str, Any]]], kind: str) -> None:
    kserve_validator(kind).validate(find(manifests, kind))


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        pytest.param("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinessProbes={}),
                     id="deployment-unknown-field"),
        pytest.param("Deployment", lambda d: d["spec"].update(replicas="two"), id="deployment-wrong-type"),
        pytest.param("HorizontalPodAutoscaler", lambda d: d["spec"].pop("scaleTargetRef"), id="hpa-missing-target"),
    ],
)
def test_core_validation_rejects_broken_manifests(
    manifests: dict[str, list[dict[str, Any]]], kind: str, mutate: Any
) -> None:
    doc = copy.deepcopy(find(manifests, kind))
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        pytest.param("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(protocolVersoin="v2"),
                     id="isvc-typo-field"),
        pytest.param("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(protocolVersion="v3"),
                     id="isvc-unknown-protocol"),
        pytest.param("InferenceService", lambda d: d.update(apiVersion="serving.kserve.io/v1alpha1"),
                     id="isvc-wrong-api-version"),
        pytest.param("ServingRuntime", lambda d: d["spec"]["containers"][0].update(imagePullPolcy="Always"),
                     id="runtime-container-typo-field"),
        pytest.param("ServingRuntime", lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
                     id="runtime-port-as-string"),
    ],
)
def test_kserve_schema_rejects_broken_manifests(
    manifests: dict[str, list[dict[str, Any]]], kind: str, mutate: Any
) -> None:
    doc = copy.deepcopy(find(manifests, kind))
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        kserve_validator(kind).validate(doc)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def server_containers(manifests: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    deployment = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    runtime = find(manifests, "ServingRuntime")["spec"]["containers"]
    return [*deployment, *runtime]


def cpu_count(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_intra_op_threads_match_the_cpu_limit(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for container in server_containers(manifests):
        limit = cpu_count(container["resources"]["limits"]["cpu"])
        threads = int(env_of(container)["BNFOLD_INTRA_OP_THREADS"])
        assert threads == limit, f"{container['name']}: {threads} threads for a CPU limit of {limit}"


def test_every_container_has_requests_and_limits(manifests: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find(manifests, "Deployment")["spec"]["template"]["spec"]
    for container in [*deployment["initContainers"], *server_containers(manifests)]:
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}, (container["name"], bound)


def test_env_names_are_real_settings(manifests: dict[str, list[dict[str, Any]]]) -> None:
    from service.config import Settings

    names = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
    for container in server_containers(manifests):
        assert set(env_of(container)) <= names, sorted(set(env_of(container)) - names)


def test_pods_run_as_the_images_non_root_user(manifests: dict[str, list[dict[str, Any]]], dockerfile: Any) -> None:
    uid, _, gid = dockerfile.final.one("USER").args.partition(":")
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsNonRoot"], pod["runAsUser"], pod["runAsGroup"]) == (True, int(uid), int(gid))
    runtime = find(manifests, "ServingRuntime")["spec"]["containers"][0]["securityContext"]
    assert (runtime["runAsNonRoot"], runtime["runAsUser"]) == (True, int(uid))
    for container in server_containers(manifests):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]


def test_images_are_this_release(manifests: dict[str, list[dict[str, Any]]]) -> None:
    from bnfold import __version__

    deployment = find(manifests, "Deployment")["spec"]["template"]["spec"]
    images = {c["image"] for c in [*deployment["initContainers"], *server_containers(manifests)]}
    assert images == {f"bnfold:{__version__}"}


def test_deployment_ports_match_the_image(manifests: dict[str, list[dict[str, Any]]], dockerfile: Any) -> None:
    exposed = int(dockerfile.final.one("EXPOSE").args)
    for container in server_containers(manifests):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(ports) == ["http", "grpc"], container["name"]  # HTTP first: KServe's URL routes to the first
        assert ports["http"] == exposed and env_of(container)["BNFOLD_PORT"] == str(exposed)
        assert env_of(container)["BNFOLD_GRPC_PORT"] == str(ports["grpc"]) and ports["grpc"] != exposed
        assert env_of(container)["BNFOLD_HOST"] == "0.0.0.0"
    service = find(manifests, "Service")
    container = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    names = {p["name"] for p in container["ports"]}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    grpc = next(p for p in service["spec"]["ports"] if p["targetPort"] == "grpc")
    assert grpc["appProtocol"] == "kubernetes.io/h2c"  # gRPC without TLS is HTTP/2 cleartext


def test_the_image_can_serve_grpc() -> None:
    """The pods set BNFOLD_GRPC_PORT, so the image's requirements include the grpc extra."""
    import tomllib
    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["grpc"]
    wanted = {Requirement(r).name for r in extra} - {"bnfold"}
    lines = (REPO / "deploy" / "requirements-serve.txt").read_text().splitlines()
    pinned = {Requirement(line).name for line in lines if line.strip() and not line.startswith("#")}
    assert wanted and wanted <= pinned, sorted(wanted - pinned)


def test_kserve_runs_raw_for_two_ports(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """Knative (KServe's default Serverless mode) routes one container port: HTTP and gRPC need RawDeployment."""
    runtime = find(manifests, "ServingRuntime")["spec"]["containers"][0]
    isvc = find(manifests, "InferenceService")
    assert len(runtime["ports"]) == 2
    assert find(manifests, "ServingRuntime")["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_selectors_and_targets_line_up(manifests: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find(manifests, "Service")["spec"]["selector"].items() <= labels.items()
    assert find(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = find(manifests, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_model_volume_is_where_the_service_reads(manifests: dict[str, list[dict[str, Any]]], dockerfile: Any) -> None:
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    repository = env_of(server)["BNFOLD_MODEL_REPOSITORY"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts[repository]["readOnly"] is True
    # The init container fills that volume from the models baked into the image.
    init = pod["initContainers"][0]
    baked = dockerfile.final.env()["BNFOLD_MODEL_REPOSITORY"]
    assert init["command"] == ["cp", "-R", f"{baked}/.", f"{repository}/"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {repository}
    # KServe serves the models baked into the image.
    runtime = find(manifests, "ServingRuntime")["spec"]["containers"][0]
    assert env_of(runtime)["BNFOLD_MODEL_REPOSITORY"] == baked


def test_inference_service_selects_the_v2_runtime(manifests: dict[str, list[dict[str, Any]]]) -> None:
    runtime = find(manifests, "ServingRuntime")
    isvc = find(manifests, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "storageUri" not in model  # the model is baked into the image
    assert [c["name"] for c in runtime["spec"]["containers"]] == ["kserve-container"]  # KServe's required name


def probes(manifests: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(probe kind, probe, container)`` for every HTTP probe of the server containers."""
    return [
        (kind, container[kind], container)
        for container in server_containers(manifests)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if kind in container
    ]


def test_probes_target_the_served_port(manifests: dict[str, list[dict[str, Any]]]) -> None:
    assert {kind for kind, _, _ in probes(manifests)} == {"startupProbe", "livenessProbe", "readinessProbe"}
    for kind, probe, container in probes(manifests):
        port = probe["httpGet"]["port"]
        named = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert (named[port] if isinstance(port, str) else port) == int(env_of(container)["BNFOLD_PORT"]), kind


def test_probes_answer_200_from_the_real_app_even_with_an_api_key(
    manifests: dict[str, list[dict[str, Any]]], digits_repository: Path
) -> None:
    """Kubernetes probes send no credentials: with BNFOLD_API_KEY set they must still pass."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from service.config import Settings
    from service.main import create_app

    app = create_app(Settings(model_repository=digits_repository, api_key=SecretStr("probe-test-key")))
    with TestClient(app) as client:
        assert client.get("/v2/models/digits").status_code == 401  # the key is really enforced
        for kind, probe, container in probes(manifests):
            response = client.get(probe["httpGet"]["path"])
            assert response.status_code == 200, (container["name"], kind, response.text)


def test_liveness_does_not_wait_for_models(manifests: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """A pod whose models are not (yet) servable must be unready, not restarted in a loop."""
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    (tmp_path / "digits" / "1").mkdir(parents=True)
    (tmp_path / "digits" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with TestClient(create_app(Settings(model_repository=tmp_path))) as client:
        for kind, probe, container in probes(manifests):
            expected = 200 if kind == "livenessProbe" else 503
            assert client.get(probe["httpGet"]["path"]).status_code == expected, (container["name"], kind)


def test_autoscaling_bounds_are_consistent(manifests: dict[str, list[dict[str, Any]]]) -> None:
    replicas = find(manifests, "Deployment")["spec"]["replicas"]
    hpa = find(manifests, "HorizontalPodAutoscaler")["spec"]
    pdb = find(manifests, "PodDisruptionBudget")["spec"]
    assert hpa["minReplicas"] <= replicas <= hpa["maxReplicas"], (replicas, hpa)
    # minAvailable below the HPA floor, or the PDB would block every node drain at minimum scale.
    assert pdb["minAvailable"] < hpa["minReplicas"], (pdb, hpa)
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"  # Utilization is relative to the CPU request, which exists:
    container = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "cpu" in container["resources"]["requests"]
