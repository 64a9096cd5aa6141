"""The Kubernetes manifests in deploy/kubernetes, validated offline.

Each manifest is checked against the API schemas bundled in ``kubernetes-validate`` (strict: an unknown
or misspelt field is an error), for the oldest Kubernetes release the manifests support (1.30, for the
native preStop ``sleep`` action) and the newest the package knows. Then the facts that span files or
tie them to the service: selectors and labels, probe paths, the shutdown budget, the security context.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from optimizer.server import HANDLER_GRACE_SECONDS
from optimizer.settings import Settings, setting_fields
from tests.conftest import ROOT
from tests.test_container import env_values, final_stage, user_id

MANIFESTS = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = MANIFESTS / "kustomization.yaml"
NAME_LABEL = "app.kubernetes.io/name"
APP = "optimizer"
# The native preStop sleep action is on by default from 1.30 (beta; GA in 1.34).
OLDEST_SUPPORTED = "1.30.0"
KUBERNETES_VERSIONS = (OLDEST_SUPPORTED, str(kubernetes_validate.latest_version()))

Manifest = dict[str, Any]


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p != KUSTOMIZATION)


def load(path: Path) -> Manifest:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, f"{path.name}: one resource per file"
    assert isinstance(documents[0], dict), path.name
    return cast(Manifest, documents[0])


@pytest.fixture(scope="module")
def by_kind() -> dict[str, Manifest]:
    resources: dict[str, Manifest] = {}
    for path in manifest_files():
        resource = load(path)
        assert resource["kind"] not in resources, f"two {resource['kind']} manifests"
        resources[resource["kind"]] = resource
    assert set(resources) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    return resources


def pod_spec(deployment: Manifest) -> Manifest:
    return cast(Manifest, deployment["spec"]["template"]["spec"])


def container(deployment: Manifest) -> Manifest:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1, "one container per pod"
    return cast(Manifest, containers[0])


def container_env(deployment: Manifest) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container(deployment).get("env", []):
        assert "value" in item, f"{item['name']}: set a literal value, so that it can be checked here"
        assert isinstance(item["value"], str), f"{item['name']}: quote the value (env values are strings)"
        env[item["name"]] = item["value"]
    return env


def prestop_sleep_seconds(deployment: Manifest) -> float:
    """The preStop pause, as the native sleep action or as ``exec: sleep N`` for older clusters."""
    hook = container(deployment).get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    if "exec" in hook:
        command = hook["exec"]["command"]
        assert Path(command[0]).name == "sleep" and len(command) == 2, command
        return float(command[1])
    return 0.0


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?")
_FACTORS = {
    None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
}  # fmt: skip


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``2``, ``500m``, ``768Mi``, ``1Gi``) as a plain number."""
    match = _QUANTITY.fullmatch(str(value))
    assert match, f"not a resource quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


# --- Schemas -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    resource = load(path)
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{path.name} is invalid for Kubernetes {version} at {where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{path.name}: {exc.message}")


def test_schema_validation_rejects_a_misspelt_field(by_kind: dict[str, Manifest]) -> None:
    """Guards the test above: strict validation must catch an unknown field, not wave it through."""
    deployment = yaml.safe_load(yaml.safe_dump(by_kind["Deployment"]))
    container(deployment)["readinessProbe"]["periodSecond"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    images = {image["name"] for image in kustomization.get("images", [])}
    deployment_images = {
        load(MANIFESTS / "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["image"]
    }
    assert images <= {image.split(":")[0] for image in deployment_images}, "an images entry matches nothing"


def test_kustomize_builds() -> None:
    """``kubectl kustomize`` renders the four resources (where kubectl is installed; it works offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


# --- Labels and selectors ------------------------------------------------------------------------------


def test_every_resource_carries_the_app_label(by_kind: dict[str, Manifest]) -> None:
    for kind, resource in by_kind.items():
        assert resource["metadata"]["labels"][NAME_LABEL] == APP, kind
        assert resource["metadata"]["name"] == APP, kind


def test_service_and_deployment_select_the_pods(by_kind: dict[str, Manifest]) -> None:
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[NAME_LABEL] == APP
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": service["spec"]["selector"],
        "PodDisruptionBudget": by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, f"the {kind} selector is empty"
        assert selector.items() <= pod_labels.items(), f"the {kind} selector {selector} misses the pods"


def test_service_routes_port_80_to_the_named_container_port(by_kind: dict[str, Manifest]) -> None:
    service, deployment = by_kind["Service"], by_kind["Deployment"]
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert port["targetPort"] == "http" and "http" in ports
    image_env = env_values(final_stage())
    assert ports["http"] == int(container_env(deployment).get("OPTIMIZER_PORT", image_env["OPTIMIZER_PORT"]))


def test_hpa_and_pdb_target_the_deployment(by_kind: dict[str, Manifest]) -> None:
    deployment, hpa, pdb = (
        by_kind["Deployment"],
        by_kind["HorizontalPodAutoscaler"],
        by_kind["PodDisruptionBudget"],
    )
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 50 <= metric["resource"]["target"]["averageUtilization"] <= 85
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"]
    # The budget must leave room for a drain to make progress, and keep at least one pod serving.
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        assert spec["maxUnavailable"] == 1
    else:
        assert 1 <= spec["minAvailable"] < hpa["spec"]["minReplicas"]


# --- Probes and shutdown -------------------------------------------------------------------------------


def test_probes_use_the_service_endpoints(by_kind: dict[str, Manifest]) -> None:
    spec = container(by_kind["Deployment"])
    readiness, liveness = spec["readinessProbe"], spec["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz" and readiness["httpGet"]["port"] == "http"
    assert liveness["httpGet"]["path"] == "/healthz" and liveness["httpGet"]["port"] == "http"
    assert readiness["periodSeconds"] == 2
    # One slow answer from a saturated pod must not take it out (a review: 12 of 19 probes over 1 s
    # with 200 clients on 2 CPUs); a deleted pod leaves the endpoints whatever its readiness.
    assert readiness["failureThreshold"] >= 3 and readiness["timeoutSeconds"] >= 2
    if "startupProbe" in spec:
        assert spec["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_grace_period_covers_prestop_drain_and_handler_grace(by_kind: dict[str, Manifest]) -> None:
    deployment = by_kind["Deployment"]
    env = container_env(deployment)
    defaults = Settings(threads=1)
    drain = float(env.get("OPTIMIZER_DRAIN_SECONDS", defaults.drain_seconds))
    delay = float(env.get("OPTIMIZER_SHUTDOWN_DELAY", defaults.shutdown_delay))
    pause = prestop_sleep_seconds(deployment)
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert pause > 0, "a preStop pause lets endpoints be withdrawn before the listener closes"
    assert delay == 0, "the preStop sleep does the pause; a shutdown delay on top only lengthens shutdown"
    needed = pause + delay + drain + HANDLER_GRACE_SECONDS
    assert grace > needed, f"terminationGracePeriodSeconds {grace} <= {needed} (preStop + delay + drain + 2)"


def test_liveness_never_fires_during_the_drain(by_kind: dict[str, Manifest]) -> None:
    """During the drain the listener is closed, so /healthz fails; the kubelet must not restart the pod."""
    deployment = by_kind["Deployment"]
    liveness = container(deployment)["livenessProbe"]
    drain = float(container_env(deployment).get("OPTIMIZER_DRAIN_SECONDS", Settings(threads=1).drain_seconds))
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain + HANDLER_GRACE_SECONDS


# --- Settings, resources, security ---------------------------------------------------------------------


def test_env_names_and_values_are_valid_settings(by_kind: dict[str, Manifest]) -> None:
    env = container_env(by_kind["Deployment"])
    real = {str(spec.metadata["env"]) for spec in setting_fields()}
    unknown = {name for name in env if name.startswith("OPTIMIZER_")} - real
    assert not unknown, f"the Deployment sets settings that do not exist: {sorted(unknown)}"
    Settings.from_env(env)  # raises SettingsError on a bad value


def test_threads_match_the_cpu_request_and_limits_hold_the_request(by_kind: dict[str, Manifest]) -> None:
    spec = container(by_kind["Deployment"])
    requests, limits = spec["resources"]["requests"], spec["resources"]["limits"]
    assert int(container_env(by_kind["Deployment"])["OPTIMIZER_THREADS"]) == quantity(requests["cpu"])
    assert quantity(limits["cpu"]) == quantity(requests["cpu"]), "CPU request = limit: no throttling surprise"
    assert quantity(requests["memory"]) <= quantity(limits["memory"])
    assert quantity(limits["memory"]) >= 2**30, "decode memory: ~300 MB per worker at the default pixel limit"


def test_container_runs_as_the_images_non_root_user(by_kind: dict[str, Manifest]) -> None:
    deployment = by_kind["Deployment"]
    pod, spec = pod_spec(deployment)["securityContext"], container(deployment)["securityContext"]
    assert pod.get("runAsNonRoot") is True or spec.get("runAsNonRoot") is True
    uid = spec.get("runAsUser", pod.get("runAsUser"))
    assert uid is not None and uid != 0
    assert str(uid) == user_id(final_stage()), "the pod's UID differs from the image's USER"
    assert spec["allowPrivilegeEscalation"] is False
    assert spec["readOnlyRootFilesystem"] is True
    assert spec["capabilities"]["drop"] == ["ALL"]
    assert "add" not in spec["capabilities"]
    seccomp = spec.get("seccompProfile", pod.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}
