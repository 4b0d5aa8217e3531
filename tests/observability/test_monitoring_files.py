"""The generated Grafana dashboards and Prometheus rules: committed files match the
generator, every expression names only series Baton exports (or rules record), and
promtool proves each alert fires when it should and stays quiet when it should not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from router import alert_rules, grafana
from router.metrics import exported_series
from tests.observability.prometheus import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/helm/baton/files/prometheus/baton-rules.yaml"
NAME = re.compile(r"baton:[A-Za-z0-9_:]+")


def recorded() -> set[str]:
    return {r["record"] for r in alert_rules.recording_rules()}


def test_committed_files_match_the_generator() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gen_monitoring.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("source", ["grafana", "rules"])
def test_expressions_name_only_exported_series(source: str) -> None:
    exprs = grafana.expressions() if source == "grafana" else alert_rules.expressions()
    known = exported_series() | recorded()
    names = {n for e in exprs for n in NAME.findall(e)}
    assert names and names <= known, sorted(names - known)
    if source == "grafana":  # dashboards read raw series only, so they work without rules
        assert not names & recorded()


def test_every_dashboard_is_in_the_chart() -> None:
    files = {p.stem for p in (ROOT / "deploy/helm/baton/files/grafana").glob("*.json")}
    assert files == set(grafana.DASHBOARDS) == {
        "baton-overview", "baton-roles", "baton-kv-transfer", "baton-planner"
    }  # fmt: skip


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([tool("promtool"), "check", "rules", str(RULES)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- promtool test rules: synthetic series, per alert a case that fires and one that not --

SLO = 'baton:slo_requests_total{{model_name="{m}",criterion="joint",result="{r}"}}'


def slo_series(model: str, met_per_min: int, missed_per_min: int, minutes: int,
               objective: float = 0.99) -> list[dict[str, str]]:  # fmt: skip
    return [
        {"series": SLO.format(m=model, r="met"), "values": f"0+{met_per_min}x{minutes}"},
        {"series": SLO.format(m=model, r="missed"), "values": f"0+{missed_per_min}x{minutes}"},
        {"series": f'baton:slo_objective{{model_name="{model}"}}',
         "values": f"{objective}+0x{minutes}"},
    ]  # fmt: skip


def annotations(alert: str, **labels: str) -> dict[str, str]:
    (rule,) = [r for r in alert_rules.alert_rules() if r["alert"] == alert][:1]
    return {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], v)
            for k, v in rule["annotations"].items()}  # fmt: skip


def burn_annotations(long: str, short: str, rate: float, model: str) -> dict[str, str]:
    rule = next(r for r in alert_rules.alert_rules()
                if r.get("labels", {}).get("long_window") == long)  # fmt: skip
    return {k: v.replace("{{ $labels.model_name }}", model) for k, v in rule["annotations"].items()}


def burn(severity: str, long: str, short: str, rate: float, model: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "severity": severity,
            "long_window": long,
            "short_window": short,
            "model_name": model,
        },  # fmt: skip
        "exp_annotations": burn_annotations(long, short, rate, model),
    }


def unit_tests() -> dict[str, Any]:
    fast = "BatonSLOErrorBudgetBurnFast"
    slow = "BatonSLOErrorBudgetBurn"
    page = ("page", "1h", "5m", 14.4)
    series = [
        *slo_series("bad", 50, 50, 400),  # half the requests miss: every burn alert
        *slo_series("fine", 995, 3, 400),  # 0.3% missed, objective 99%: none
        *slo_series("few", 0, 0, 400),  # every request misses, but too few: none
    ]
    series[-3]["values"] = "0+0x400"
    series[-2]["values"] = "0+0.05x400"  # one request per 20 minutes, all missed
    plan = [
        {"series": 'baton:plan_predicted_attainment{model_name="bad"}', "values": "0.95+0x400"},
        {"series": 'baton:plan_predicted_attainment{model_name="fine"}', "values": "0.95+0x400"},
    ]
    kv = [
        {"series": 'baton:kv_transfer_seconds_count{model_name="bad",backend="torch"}',
         "values": "0+10x60"},
        {"series": 'baton:kv_transfer_failures_total{model_name="bad",backend="torch",'
                   'instance_name="decode-0",role="decode",node="local"}',
         "values": "0+2x60"},
        {"series": 'baton:kv_transfer_seconds_count{model_name="fine",backend="grpc"}',
         "values": "0+10x60"},
        {"series": 'baton:kv_transfer_failures_total{model_name="fine",backend="grpc",'
                   'instance_name="decode-0",role="decode",node="local"}',
         "values": "0+0x60"},
    ]  # fmt: skip
    below = "BatonAttainmentBelowPlan"
    kv_alert = "BatonKVTransferFailures"
    return {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series + plan + kv,
                "alert_rule_test": [
                    # Not yet: the condition holds, but not for the rule's `for` (2m).
                    {"eval_time": "1m", "alertname": fast, "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": fast,
                        "exp_alerts": [burn(*page, "bad")],
                    },  # fmt: skip
                    # Past its 15m of `for`, the 6h/30m pair fires as well; "few" and
                    # "fine" stay quiet (too few requests; under budget).
                    {
                        "eval_time": "390m",
                        "alertname": fast,
                        "exp_alerts": [burn(*page, "bad"), burn("page", "6h", "30m", 6.0, "bad")],
                    },
                    {
                        "eval_time": "50m",
                        "alertname": slow,
                        "exp_alerts": [],
                    },  # the 1d/2h pair needs its hour of `for`
                    {
                        "eval_time": "150m",
                        "alertname": slow,
                        "exp_alerts": [burn("ticket", "1d", "2h", 3.0, "bad")],
                    },
                    {
                        "eval_time": "100m",
                        "alertname": below,
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "ticket", "model_name": "bad"},
                                "exp_annotations": annotations(below, model_name="bad"),
                            }
                        ],
                    },
                    {"eval_time": "20m", "alertname": below, "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": kv_alert,
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "ticket",
                                    "model_name": "bad",
                                    "backend": "torch",
                                },
                                "exp_annotations": annotations(
                                    kv_alert, model_name="bad", backend="torch"
                                ),
                            }
                        ],
                    },
                ],  # fmt: skip
            }
        ],
    }


def test_promtool_proves_each_alert_fires_and_stays_quiet(tmp_path: Path) -> None:
    path = tmp_path / "baton-rules-test.yaml"
    path.write_text(yaml.safe_dump(unit_tests(), sort_keys=False))
    done = subprocess.run([tool("promtool"), "test", "rules", str(path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
