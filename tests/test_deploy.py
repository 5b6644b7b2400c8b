"""The deployment files, checked offline (no Docker engine or cluster exists here):
docker-compose.yml (+ the GPU override) against the Compose Specification schema that
check-jsonschema vendors, the Kubernetes manifests against the Kubernetes OpenAPI schemas
that kubernetes-validate bundles (strict: unknown fields fail), and the wiring between them
and the code: settings names, ports, the health command, the Dockerfile's build args and
the folders it must copy.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from clipsearch.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # native gRPC probes are GA since 1.27
SETTINGS_ENV = {Settings.env_name(f.name) for f in fields(Settings)}


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text(encoding="utf-8")
    )
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(schema)(schema)
    return validator


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`docker compose -f base -f override` for mappings (all the override holds)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def k8s_documents() -> dict[tuple[str, str], dict[str, Any]]:
    """The resources of deploy/k8s/ by (kind, name); kustomization.yaml is kubectl's
    build file, not a resource."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


# --- compose --------------------------------------------------------------------------


def test_compose_files_follow_the_compose_specification() -> None:
    validator = compose_validator()
    base = load_yaml(ROOT / "docker-compose.yml")
    gpu = load_yaml(ROOT / "docker-compose.gpu.yml")
    for document in (base, gpu, merged(base, gpu)):
        errors = [error.message for error in validator.iter_errors(document)]
        assert errors == []
    # The check bites: a misspelt key is rejected.
    broken = copy.deepcopy(base)
    broken["services"]["clipsearch"]["healthcheck"]["intervall"] = "10s"
    assert not validator.is_valid(broken)


def test_compose_wires_clipsearch_to_a_healthy_milvus_standalone() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"etcd", "minio", "milvus", "clipsearch"}
    assert all("healthcheck" in service for service in services.values())
    milvus = services["milvus"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"] == {"ETCD_ENDPOINTS": "etcd:2379", "MINIO_ADDRESS": "minio:9000"}
    assert {d: c["condition"] for d, c in milvus["depends_on"].items()} == {
        "etcd": "service_healthy",
        "minio": "service_healthy",
    }
    clipsearch = services["clipsearch"]
    assert clipsearch["depends_on"] == {"milvus": {"condition": "service_healthy"}}
    env = clipsearch["environment"]
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert env["CLIPSEARCH_MILVUS_URI"] == "http://milvus:19530"
    assert env["CLIPSEARCH_HOST"] == "0.0.0.0"
    port = int(env["CLIPSEARCH_PORT"])
    assert clipsearch["ports"] == [f"{port}:{port}"]
    assert clipsearch["healthcheck"]["test"] == [
        "CMD", "clipsearch", "health", "--server", f"127.0.0.1:{port}"
    ]  # fmt: skip
    # Data lives in named volumes, declared once.
    used = {volume.split(":")[0] for service in services.values() for volume in service["volumes"]}
    assert used == set(compose["volumes"])


def test_gpu_override_builds_the_cuda_image_and_reserves_a_gpu() -> None:
    base = load_yaml(ROOT / "docker-compose.yml")
    service = merged(base, load_yaml(ROOT / "docker-compose.gpu.yml"))["services"]["clipsearch"]
    assert service["build"]["context"] == "."
    assert service["build"]["args"]["EXTRA"] == "gpu"
    assert service["build"]["args"]["BASE"].startswith("nvidia/cuda:")
    assert service["environment"]["CLIPSEARCH_DEVICE"] == "cuda"
    assert set(service["environment"]) <= SETTINGS_ENV
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert service["environment"]["CLIPSEARCH_MILVUS_URI"] == "http://milvus:19530"


def test_dockerfile_takes_the_build_args_and_copies_every_linked_folder() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    build_args = set(re.findall(r"^ARG (\w+)", dockerfile, re.MULTILINE))
    for compose_file in ("docker-compose.yml", "docker-compose.gpu.yml"):
        args = load_yaml(ROOT / compose_file)["services"]["clipsearch"]["build"]["args"]
        assert set(args) <= build_args
    # src/clipsearch/* are links: a folder the image does not copy is a dangling link there.
    copied = set(re.findall(r"^COPY (\S+) \./\S+$", dockerfile, re.MULTILINE))
    for link in (ROOT / "src" / "clipsearch").iterdir():
        if link.is_symlink():
            top = link.resolve().relative_to(ROOT).parts[0]
            assert top in copied, f"the Dockerfile does not COPY {top}/ ({link.name} links there)"


# --- Kubernetes -------------------------------------------------------------------------


def test_manifests_follow_the_kubernetes_schemas_strictly() -> None:
    docs = k8s_documents()
    assert len(docs) == 6
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(docs[("Deployment", "clipsearch")])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):  # the check bites
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_manifests_wire_probes_services_config_and_secret() -> None:
    docs = k8s_documents()
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "secret.example.yaml",
    }
    deployment = docs[("Deployment", "clipsearch")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    [container] = pod["spec"]["containers"]
    config = docs[("ConfigMap", "clipsearch")]["data"]
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    port = int(config["CLIPSEARCH_PORT"])
    assert container["ports"] == [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}
    assert container["envFrom"] == [{"configMapRef": {"name": "clipsearch"}}]
    secret = docs[("Secret", "clipsearch")]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(from_secret) == {"CLIPSEARCH_AUTH_TOKEN", "CLIPSEARCH_MILVUS_TOKEN"}
    assert not set(from_secret) & set(config)  # tokens never in the ConfigMap
    for ref in from_secret.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    # Draining fits in the grace period: preStop pause + the server's own grace period.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(config["CLIPSEARCH_GRACE_PERIOD_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + grace
    assert int(config["CLIPSEARCH_INTRA_OP_THREADS"]) == int(
        container["resources"]["requests"]["cpu"]
    )
    service = docs[("Service", "clipsearch")]
    headless = docs[("Service", "clipsearch-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in service["spec"]
    for svc in (service, headless):
        assert svc["spec"]["selector"] == labels
        assert svc["spec"]["ports"][0]["targetPort"] == "grpc"
    assert (
        docs[("PodDisruptionBudget", "clipsearch")]["spec"]["minAvailable"]
        < deployment["spec"]["replicas"]
    )


# --- client-side load balancing (what docs/DEPLOY.md tells clients to do) --------------


def test_round_robin_client_option_spreads_calls_over_replicas(tmp_path: Path) -> None:
    """Two real servers stand in for the pods behind a headless Service: DNS would give the
    client both addresses; here an `ipv4:` target lists them. With the documented option
    calls alternate between replicas; without it (gRPC's pick_first) they all go to one."""
    from server_fixtures import ThreadedServer, quick_settings

    from clipsearch.client import Client

    with (
        ThreadedServer(quick_settings(tmp_path / "a.db")) as first,
        ThreadedServer(quick_settings(tmp_path / "b.db")) as second,
    ):
        for server, name in ((first, "on_a"), (second, "on_b")):
            with Client(server.address) as client:
                client.create_collection(name)
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"

        def replicas_seen(options: list[tuple[str, Any]]) -> list[str]:
            with Client(target, options=options) as client:
                client.wait_until_ready(timeout=30)
                return [client.list_collections()[0].name for _ in range(20)]

        spread = replicas_seen([("grpc.lb_policy_name", "round_robin")])
        assert set(spread) == {"on_a", "on_b"}
        assert set(replicas_seen([])) in ({"on_a"}, {"on_b"})
