"""The deployment recipes that need a cluster or a container runtime, checked here without one:
deploy/helm/values.yaml against the keys the official chart (dagster/dagster 1.13) documents and
against deploy/dagster.yaml; deploy/Dockerfile against the Helm values; deploy/systemd/ against
deploy/Procfile (which e2e/test_deploy.py runs).

Where the chart documents a key is named beside it: "values.yaml" is the chart's helm/dagster/values.yaml,
"schema" its values.schema.json (generated from helm/dagster/schema/schema/charts/dagster/subschema/*.py),
"subchart" charts/dagster-user-deployments/values.yaml, "instance" templates/configmap-instance.yaml
(which turns the values into the instance's dagster.yaml) and "concurrency.tpl" its helper
templates/helpers/instance/_concurrency.tpl.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from smallcaps_ingest.config import Config, variables
from smallcaps_ingest_tests.conftest import BIN, REPO
from smallcaps_ingest_tests.deploy_helpers import DEPLOY, SYSTEMD, VARIABLE, env_file, procfile, unit_service

VALUES = DEPLOY / "helm" / "values.yaml"
INSTANCE = DEPLOY / "dagster.yaml"
SECRET_NAMES = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|CREDENTIAL", re.I)

# The mappings the values set, and the keys the chart documents in each. Paths: dotted keys, "[]"
# for the items of a list.
DOCUMENTED: dict[str, set[str]] = {
    # schema: properties (and values.yaml's top-level sections)
    "": {"global", "nameOverride", "fullnameOverride", "rbacEnabled", "imagePullSecrets",
         "dagsterWebserver", "computeLogManager", "pythonLogs", "dagster-user-deployments",
         "scheduler", "runLauncher", "postgresql", "generatePostgresqlPasswordSecret",
         "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "dagsterDaemon",
         "busybox", "extraManifests", "migrate", "telemetry", "serviceAccount", "retention",
         "additionalInstanceConfig", "concurrency"},
    # values.yaml: global
    "global": {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName"},
    # values.yaml: postgresql; schema: definitions.PostgreSQL
    "postgresql": {"enabled", "image", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                   "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service"},
    "postgresql.service": {"port"},
    # schema: definitions.RunLauncher (type, config) and RunLauncherConfig
    "runLauncher": {"type", "config"},
    "runLauncher.config": {"k8sRunLauncher", "celeryK8sRunLauncher", "customRunLauncher"},
    # values.yaml: runLauncher.config.k8sRunLauncher; schema: definitions.K8sRunLauncherConfig
    "runLauncher.config.k8sRunLauncher": {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
        "envConfigMaps", "envSecrets", "envVars", "volumes", "volumeMounts", "labels", "resources",
        "schedulerName", "failPodOnRunFailure", "securityContext", "runK8sConfig"},
    # values.yaml: dagsterDaemon; schema: definitions.Daemon
    "dagsterDaemon": {
        "enabled", "image", "heartbeatTolerance", "runCoordinator", "runMonitoring", "runRetries",
        "sensors", "schedules", "env", "envConfigMaps", "envSecrets", "deploymentLabels", "labels",
        "volumes", "volumeMounts", "annotations", "nodeSelector", "affinity", "tolerations",
        "podSecurityContext", "securityContext", "resources", "schedulerName", "livenessProbe",
        "readinessProbe", "startupProbe"},
    # schema: definitions.RunCoordinator, RunCoordinatorConfig, QueuedRunCoordinatorConfig
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    "dagsterDaemon.runCoordinator.config": {"queuedRunCoordinator", "customRunCoordinator"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds", "dequeueUseThreads",
        "dequeueNumWorkers", "blockOpConcurrencyLimitedRuns"},
    # values.yaml: dagsterDaemon.runMonitoring (schema: a free-form object; instance renders these)
    "dagsterDaemon.runMonitoring": {"enabled", "startTimeoutSeconds", "cancelTimeoutSeconds",
                                    "pollIntervalSeconds", "maxResumeRunAttempts",
                                    "freeSlotsAfterRunEndSeconds"},
    # values.yaml: dagsterDaemon.runRetries (instance renders enabled and max_retries)
    "dagsterDaemon.runRetries": {"enabled", "maxRetries"},
    # schema: Concurrency, ConcurrencyPools, ConcurrencyRuns (subschema/concurrency.py);
    # concurrency.tpl renders them
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    # values.yaml: dagster-user-deployments; schema: definitions.UserDeployments
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    # values.yaml: dagster-user-deployments.deployments[]; subchart: deployments[]
    "dagster-user-deployments.deployments[]": {
        "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "port", "includeConfigInLaunchedRuns",
        "env", "envConfigMaps", "envSecrets", "labels", "volumes", "volumeMounts", "initContainers",
        "sidecarContainers", "annotations", "nodeSelector", "affinity", "tolerations",
        "podSecurityContext", "securityContext", "resources", "schedulerName", "readinessProbe",
        "livenessProbe", "startupProbe", "service"},
    # schema: definitions.Image
    "dagster-user-deployments.deployments[].image": {"repository", "tag", "pullPolicy"},
    "dagster-user-deployments.deployments[].includeConfigInLaunchedRuns": {"enabled"},
    # values.yaml: telemetry
    "telemetry": {"enabled"},
}
# Kubernetes objects (EnvVar, SecretEnvSource, ResourceRequirements): their keys are Kubernetes'.
K8S_OBJECTS = ("envSecrets[]", "env[]", "resources")

# Each setting the recipe needs, at the key path the chart documents for it.
SETTINGS: list[tuple[str, Any]] = [
    ("runLauncher.type", "K8sRunLauncher"),  # values.yaml: "Type can be one of [K8sRunLauncher, ...]"
    ("postgresql.enabled", False),  # values.yaml: false "to use an existing external PostgreSQL"
    ("generatePostgresqlPasswordSecret", False),  # values.yaml: secret "managed outside of this chart"
    ("dagsterDaemon.runCoordinator.enabled", True),  # values.yaml: "enable the run queue"
    ("dagsterDaemon.runCoordinator.type", "QueuedRunCoordinator"),  # schema: RunCoordinatorType
    ("dagsterDaemon.runMonitoring.enabled", True),  # values.yaml; instance: run_monitoring
    ("dagsterDaemon.runRetries.enabled", True),  # values.yaml; instance: run_retries
    ("concurrency.enabled", True),  # schema: Concurrency.enabled; concurrency.tpl renders if enabled
    ("dagster-user-deployments.enabled", True),  # values.yaml: "Creates a workspace file"
    ("dagster-user-deployments.enableSubchart", True),  # values.yaml: deployed by this release
    ("telemetry.enabled", False),  # values.yaml: telemetry
]


def _values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def _at(tree: Any, path: str) -> Any:
    for key in path.split("."):
        assert isinstance(tree, dict) and key in tree, f"{path}: no {key!r} in the values"
        tree = tree[key]
    return tree


def _undocumented(node: Any, path: str = "") -> list[str]:
    """Keys of the values that the chart does not document at their place (typos, invented keys)."""
    if path.endswith(K8S_OBJECTS):
        return []
    if isinstance(node, list):
        return [bad for item in node for bad in _undocumented(item, f"{path}[]")]
    if not isinstance(node, dict):
        return []
    if path not in DOCUMENTED:
        return [f"{path} (a mapping the test does not know)"]
    bad = [f"{path}.{k}".lstrip(".") for k in node if k not in DOCUMENTED[path]]
    return bad + [b for k, v in node.items() for b in _undocumented(v, f"{path}.{k}".lstrip("."))]


def _deployment(values: dict[str, Any]) -> dict[str, Any]:
    deployments = _at(values, "dagster-user-deployments.deployments")
    assert len(deployments) == 1, deployments
    return deployments[0]


def _env_vars(node: Any) -> list[dict[str, Any]]:
    """Every Kubernetes EnvVar ({name, value | valueFrom}) anywhere in the values."""
    if isinstance(node, list):
        return [e for item in node for e in _env_vars(item)]
    if not isinstance(node, dict):
        return []
    own = [node] if "name" in node and ("value" in node or "valueFrom" in node) else []
    return own + [e for v in node.values() for e in _env_vars(v)]


# ---------------------------------------------------------------------------------------------
# Helm values
# ---------------------------------------------------------------------------------------------
def test_helm_values_use_only_keys_the_chart_documents() -> None:
    assert _undocumented(_values()) == []


def test_an_undocumented_key_is_caught() -> None:
    """The check above can fail: a misspelt key (the chart would ignore it silently) is reported."""
    values = copy.deepcopy(_values())
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    monitoring["freeSlotsAfterRunEndSecond"] = monitoring.pop("freeSlotsAfterRunEndSeconds")
    _deployment(values)["dagsterApiGrpcArg"] = ["-m", "smallcaps_ingest"]
    assert _undocumented(values) == [
        "dagsterDaemon.runMonitoring.freeSlotsAfterRunEndSecond",
        "dagster-user-deployments.deployments[].dagsterApiGrpcArg",
    ]


@pytest.mark.parametrize(("path", "expected"), SETTINGS, ids=[p for p, _ in SETTINGS])
def test_helm_values_set(path: str, expected: Any) -> None:
    assert _at(_values(), path) == expected


def test_helm_values_agree_with_the_team_instance() -> None:
    """The chart writes the instance's dagster.yaml itself: its run queue, pool, monitoring and
    retries must be deploy/dagster.yaml's (every key of those sections has its Helm value)."""
    values, instance = _values(), yaml.safe_load(INSTANCE.read_text())
    # concurrency.runs.maxConcurrentRuns (schema: ConcurrencyRuns; concurrency.tpl: runs)
    assert _at(values, "concurrency.runs") == {
        "maxConcurrentRuns": instance["concurrency"]["runs"]["max_concurrent_runs"]}
    # Dagster refuses run_coordinator's limit beside `concurrency` (concurrency.tpl refuses both too)
    assert "config" not in values["dagsterDaemon"]["runCoordinator"]
    pools = instance["concurrency"]["pools"]
    # concurrency.pools.defaultLimit, .granularity (schema: ConcurrencyPools; concurrency.tpl: pools)
    assert _at(values, "concurrency.pools") == {"defaultLimit": pools["default_limit"],
                                                "granularity": pools["granularity"]}
    # dagsterDaemon.runMonitoring.* (values.yaml: runMonitoring; instance: run_monitoring)
    camel = {k: re.sub(r"_(\w)", lambda m: m.group(1).upper(), k) for k in instance["run_monitoring"]}
    assert _at(values, "dagsterDaemon.runMonitoring") == {
        camel[k]: v for k, v in instance["run_monitoring"].items()}
    retries = dict(instance["run_retries"])
    # instance renders no key for it: the run retries daemon's default (true) applies
    assert retries.pop("retry_on_asset_or_op_failure") is True
    # dagsterDaemon.runRetries.enabled, .maxRetries (values.yaml: runRetries; instance: run_retries)
    assert _at(values, "dagsterDaemon.runRetries") == {"enabled": retries.pop("enabled"),
                                                       "maxRetries": retries.pop("max_retries")}
    assert not retries, f"deploy/dagster.yaml's run_retries has keys the Helm values miss: {retries}"
    assert values["telemetry"]["enabled"] == instance["telemetry"]["enabled"]
    # the instance database's driver, as DAGSTER_PG_URL's postgresql+psycopg2:// in deploy/dagster.yaml
    assert _at(values, "postgresql.postgresqlScheme") == "postgresql+psycopg2"
    assert "postgresql+psycopg2://" in INSTANCE.read_text()


def test_helm_user_code_deployment() -> None:
    """This package's code server: `dagster api grpc -m smallcaps_ingest` on its port, its runs
    launched with the same configuration."""
    dep = _deployment(_values())
    # values.yaml: deployments[].dagsterApiGrpcArgs, "Arguments to `dagster api grpc`"
    assert dep["dagsterApiGrpcArgs"] == ["-m", "smallcaps_ingest"]
    assert isinstance(dep["port"], int)  # values.yaml: deployments[].port
    assert dep["image"]["repository"] and dep["image"]["tag"]  # schema: Image
    assert dep["includeConfigInLaunchedRuns"] == {"enabled": True}  # subchart: "pods launched for runs"
    # the run pods' size is the deployment's: its container context wins over the run launcher's
    # default (subchart templates/_helpers.tpl, k8sContainerContext), so none is set there
    assert dep["resources"]["requests"]["memory"]
    assert "resources" not in _at(_values(), "runLauncher.config.k8sRunLauncher")


def test_helm_secrets_are_referenced_never_inline() -> None:
    values, text = _values(), VALUES.read_text()
    secret = "smallcaps-polygon"
    # the API key: a Secret every run pod and the code server get (values.yaml: envSecrets)
    assert {"name": secret} in _deployment(values)["envSecrets"]
    assert {"name": secret} in _at(values, "runLauncher.config.k8sRunLauncher.envSecrets")
    # the database password: the Secret global.postgresqlSecretName, key postgresql-password
    pg_secret = _at(values, "global.postgresqlSecretName")
    assert _at(values, "postgresql.postgresqlPassword") == ""
    # the header's commands create exactly these Secrets with the keys the chart and config read
    creates = re.findall(r"kubectl create secret generic (\S+) --from-literal=(\w[\w-]*)=", text)
    assert sorted(creates) == sorted([(secret, "POLYGON_API_KEY"), (pg_secret, "postgresql-password")])
    assert "POLYGON_API_KEY" in {v for v, _, _ in variables()}
    # no env var that names a secret carries a literal value, anywhere in the values
    inline = [e["name"] for e in _env_vars(values) if SECRET_NAMES.search(e["name"]) and "value" in e]
    assert not inline, inline
    assert not [v for v in _at(values, "runLauncher.config").get("k8sRunLauncher", {}).get("envVars", [])
                if "=" in v and SECRET_NAMES.search(v.split("=", 1)[0])]
    # and no URL with credentials in it
    assert not re.search(r"://[^/\s:@]+:[^/\s@]*@", text)


def test_helm_environment_is_valid_settings() -> None:
    """The user code's environment: the Redis budget, an s3:// tree, the rate; every name is a
    setting of config.py, and the values pass its validation (SMALLCAPS_DATA_DIR aside: s3:// is
    issue 20's part 1, refused until it lands)."""
    env = {e["name"]: e["value"] for e in _deployment(_values())["env"]}
    assert set(env) <= {v for v, _, _ in variables()}, set(env) - {v for v, _, _ in variables()}
    assert env["POLYGON_BUDGET_URL"].startswith("redis://")
    assert env["SMALLCAPS_DATA_DIR"].startswith("s3://")
    cfg = Config.from_env({k: v for k, v in env.items() if k != "SMALLCAPS_DATA_DIR"})
    assert cfg.budget_url == env["POLYGON_BUDGET_URL"] and cfg.max_rps == float(env["POLYGON_MAX_RPS"])


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    lines = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_serves_the_code_location_of_the_helm_values() -> None:
    instructions = _dockerfile()
    dep = _deployment(_values())
    assert re.fullmatch(r"python:3\.1[1-9]-slim", instructions[0][1]), instructions[0]
    assert ("COPY", "pyproject.toml ./") in instructions
    assert ("COPY", "smallcaps_ingest ./smallcaps_ingest") in instructions
    installs = [shlex.split(arg) for op, arg in instructions if op == "RUN" and "pip install" in arg]
    assert len(installs) == 1 and installs[0][:3] == ["pip", "install", "."], installs
    # dagster-k8s in the version that goes with dagster-postgres's (the chart's run pods need it)
    k8s_pin = next(a for a in installs[0] if a.startswith("dagster-k8s=="))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"dagster-postgres=={k8s_pin.split("==")[1]}"' in pyproject, (k8s_pin, "dagster-postgres pin")
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd == ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(dep["port"]),
                   *dep["dagsterApiGrpcArgs"]]
    assert dict(instructions)["EXPOSE"] == str(dep["port"])
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"*", "!pyproject.toml", "!smallcaps_ingest/"} <= set(ignore)


# ---------------------------------------------------------------------------------------------
# Procfile, workspace and systemd units
# ---------------------------------------------------------------------------------------------
def test_procfile_runs_the_three_processes_on_the_grpc_workspace() -> None:
    procs = {name: shlex.split(cmd) for name, cmd in procfile().items()}
    assert set(procs) == {"codeserver", "webserver", "daemon"}
    code = procs["codeserver"]
    assert code[:3] == ["dagster", "api", "grpc"] and code[code.index("-h") + 1] == "127.0.0.1"
    assert code[code.index("-m") + 1] == "smallcaps_ingest"
    assert procs["webserver"][0] == "dagster-webserver" and procs["daemon"][:2] == ["dagster-daemon", "run"]
    for name in ("webserver", "daemon"):
        argv = procs[name]
        assert argv[argv.index("-w") + 1] == "deploy/workspace.yaml", name
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    (location,) = workspace["load_from"]
    grpc = location["grpc_server"]
    assert grpc["host"] == "127.0.0.1" and grpc["port"] == {"env": "SMALLCAPS_CODE_SERVER_PORT"}
    assert code[code.index("-p") + 1] == "${SMALLCAPS_CODE_SERVER_PORT}"
    assert grpc["location_name"] == code[code.index("--location-name") + 1]


def test_env_file_sets_every_variable_and_no_secret() -> None:
    used = {v for cmd in procfile().values() for v in VARIABLE.findall(cmd)} | {"SMALLCAPS_CODE_SERVER_PORT"}
    env = env_file()
    assert used <= set(env), used - set(env)
    assert not {"POLYGON_API_KEY", "DAGSTER_PG_URL"} & set(env)  # those live in secrets.env
    assert set(env) - used <= {v for v, _, _ in variables()} | {"DAGSTER_HOME"}, set(env) - used


def test_systemd_units_start_the_procfile_commands() -> None:
    units = {p.name: unit_service(p) for p in sorted(SYSTEMD.glob("*.service"))}
    procs = procfile()
    assert set(units) == {f"smallcaps-{name}.service" for name in procs}
    for name, command in procs.items():
        service = units[f"smallcaps-{name}.service"]
        (workdir,) = service["WorkingDirectory"]
        (exec_start,) = service["ExecStart"]
        prefix = f"{workdir}/.venv/bin/"  # the checkout's virtualenv; relative paths from the checkout
        assert exec_start.startswith(prefix), exec_start
        assert exec_start[len(prefix):] == command, name
        files = [Path(f.lstrip("-")).name for f in service["EnvironmentFile"]]
        assert files == ["smallcaps.env", "secrets.env"], files


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own check of the units (syntax, directives, executables), with this checkout and
    its virtualenv in place of /opt/smallcaps."""
    for unit in SYSTEMD.glob("*.service"):
        text = unit.read_text().replace("/opt/smallcaps/.venv/bin/", f"{BIN}/")
        (tmp_path / unit.name).write_text(text.replace("/opt/smallcaps", str(REPO)))
    out = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, tmp_path.glob("*.service")))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
