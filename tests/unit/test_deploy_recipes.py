"""The deployment recipes under deploy/ are valid: systemd accepts the units, Kubernetes' own models
accept every manifest field for field, the manifests agree with each other, and the pgbouncer.ini
they carry is one pgmux loads."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pgmux.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES = ROOT / "deploy" / "kubernetes"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart= is executable: point it at a stand-in for the installed pgmux.
    stub = tmp_path / "pgmux"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    for unit in SYSTEMD.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/local/bin/pgmux", str(stub)))
    (tmp_path / "pgmux@2.service").symlink_to(tmp_path / "pgmux@.service")  # an instance of the template
    units = ["pgmux.socket", "pgmux.service", "pgmux@.service", "pgmux@2.service"]
    proc = subprocess.run([analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"})
    # an unknown key is only a warning on stderr: none is allowed either
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def _manifests() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_are_valid_objects() -> None:
    client = pytest.importorskip("kubernetes.client")
    api = client.ApiClient()
    docs = _manifests()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret",
                                               "Service", "Service"]
    for doc in docs:
        version = doc["apiVersion"].split("/")[-1].capitalize()
        model = api._ApiClient__deserialize(doc, f"{version}{doc['kind']}")  # raises on a missing required field
        # A field the model does not know (a typo, a wrong level) is dropped: the round trip shows it.
        assert api.sanitize_for_serialization(model) == doc, doc["kind"]


def test_kubernetes_manifests_agree_with_each_other(tmp_path: Path) -> None:
    docs = _manifests()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for selector in [deployment["spec"]["selector"]["matchLabels"], by_kind["PodDisruptionBudget"][0]["spec"]
                     ["selector"]["matchLabels"], *(s["spec"]["selector"] for s in by_kind["Service"])]:
        assert selector.items() <= labels.items()
    for service in by_kind["Service"]:
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == by_kind["ConfigMap"][0]["metadata"]["name"]
    assert volumes["userlist"]["secret"]["secretName"] == by_kind["Secret"][0]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "SHUTDOWN WAIT_FOR_CLIENTS" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    # the ini pgmux is given: it loads, and names the files and ports the manifests provide
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(by_kind["ConfigMap"][0]["data"]["pgbouncer.ini"])
    settings = load_config(str(ini)).settings
    assert settings.auth_file == f"{mounts['userlist']}/userlist.txt"
    assert settings.listen_port == ports["postgres"]
    assert settings.metrics_listen.endswith(f":{ports['metrics']}")
    assert settings.unix_socket_dir == mounts["run"] and settings.pidfile.startswith(mounts["run"])
    assert container["command"][-1] == f"{mounts['config']}/pgbouncer.ini"
    assert settings.peer_id > 0 and 0 in load_config(str(ini)).peers
