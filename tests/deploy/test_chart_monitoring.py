"""Monitoring objects: the SLO dashboard branch's generated files (Grafana dashboards in
files/grafana/*.json, Prometheus rules in files/prometheus/baton-rules.yaml) are picked
up when present, and a chart without them still renders a clear, valid result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import chart

MONITORING = {"monitoring": {"enabled": True}}
DASHBOARD = {"title": "Baton SLOs", "uid": "baton-slo", "panels": [{"type": "timeseries"}]}
RULES = {
    "groups": [
        {
            "name": "baton.slo",
            "rules": [
                {"record": "baton:ttft_attainment:ratio_rate5m", "expr": "sum(rate(x[5m]))"},
                {"alert": "BatonSLOBurn", "expr": "baton:ttft_attainment:ratio_rate5m < 0.9",
                 "for": "10m", "labels": {"severity": "warning"}},
            ],
        }
    ]
}  # fmt: skip


def _chart_with(tmp_path: Path, dashboards: dict[str, Any], rules: str | None) -> Path:
    dst = tmp_path / "baton"
    shutil.copytree(chart.CHART, dst, ignore=shutil.ignore_patterns("files"))
    (dst / "files" / "grafana").mkdir(parents=True)
    (dst / "files" / "prometheus").mkdir()
    for name, body in dashboards.items():
        (dst / "files" / "grafana" / name).write_text(json.dumps(body))
    if rules is not None:
        (dst / "files" / "prometheus" / "baton-rules.yaml").write_text(rules)
    return dst


def _objects(rendered: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [o for o in chart.manifests(rendered) if o["kind"] == kind]


def test_generated_files_are_shipped(tmp_path: Path) -> None:
    path = _chart_with(tmp_path, {"baton_slo.json": DASHBOARD}, yaml.safe_dump(RULES))
    rendered = chart.render(MONITORING, chart=path)
    for obj in chart.manifests(rendered):
        chart.validate(obj)
    (cm,) = _objects(rendered, "ConfigMap")
    assert cm["metadata"]["name"] == "baton-dashboard-baton-slo"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["baton_slo.json"]) == DASHBOARD
    (rule,) = _objects(rendered, "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert [g["name"] for g in groups] == ["baton.availability", "baton.slo"]
    assert groups[1] == RULES["groups"][0]
    assert "1 dashboard ConfigMap(s)" in rendered["baton/templates/NOTES.txt"]


def test_the_chart_ships_the_generated_dashboards_and_rules() -> None:
    rendered = chart.render(MONITORING)
    shipped = sorted(p.name for p in (chart.CHART / "files" / "grafana").glob("*.json"))
    assert len(shipped) == 4
    names = {cm["data"].popitem()[0] for cm in _objects(rendered, "ConfigMap")}
    assert names == set(shipped)
    (rule,) = _objects(rendered, "PrometheusRule")
    ours = yaml.safe_load((chart.CHART / "files" / "prometheus" / "baton-rules.yaml").read_text())
    assert rule["spec"]["groups"][1:] == ours["groups"]


def test_without_generated_files_the_render_is_clear_and_valid(tmp_path: Path) -> None:
    rendered = chart.render(MONITORING, chart=_chart_with(tmp_path, {}, None))
    for obj in chart.manifests(rendered):
        chart.validate(obj)
    assert _objects(rendered, "ConfigMap") == []
    (rule,) = _objects(rendered, "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["baton.availability"]
    assert len(_objects(rendered, "PodMonitor")) == 3
    assert len(_objects(rendered, "ServiceMonitor")) == 1
    assert "no dashboards in files/grafana/" in rendered["baton/templates/NOTES.txt"]


def test_monitoring_is_off_by_default() -> None:
    kinds = {o["kind"] for o in chart.manifests(chart.render({}))}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}


@pytest.mark.parametrize(
    "rules,needle",
    [("groups: []\n", "must hold a non-empty `groups:` list"), ("- a\n- b\n", "not valid YAML")],
)
def test_a_broken_rules_file_fails_the_render(tmp_path: Path, rules: str, needle: str) -> None:
    import helm_python as helm

    path = _chart_with(tmp_path, {}, rules)
    with pytest.raises(helm.HelmRenderError, match="files/prometheus/baton-rules.yaml") as info:
        chart.render(MONITORING, chart=path)
    assert needle in str(info.value)
