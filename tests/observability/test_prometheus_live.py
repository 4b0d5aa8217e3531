"""A real Prometheus on loopback scrapes a real `baton serve` (with the generated rules
loaded) while requests flow; every dashboard panel expression and every recording rule
then returns data through Prometheus's HTTP API, and every alert expression evaluates,
each series it names having data. Only metrics Baton exports are named (checked in
test_monitoring_files)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from router import alert_rules, grafana
from tests.observability import prometheus
from tests.observability import served as served_mod

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/helm/baton/files/prometheus/baton-rules.yaml"
NAME = re.compile(r"baton:[A-Za-z0-9_:]+")


def test_every_panel_and_rule_returns_data(served: served_mod.Served) -> None:
    target = f"{served.host}:{served.port}"
    with prometheus.server(target, RULES) as prom, served_mod.Load(served) as load:
        up = prom.wait_for('up{job="baton"} == 1')
        assert up, "prometheus never scraped baton serve"
        # Enough scrapes for rate() over 1m to see requests finish in between.
        deadline = time.monotonic() + 120
        while load.sent < 8 and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(15)
        empty = []
        for expr in grafana.expressions():
            concrete = grafana.concrete(expr, "1m")
            if not prom.query(concrete):
                empty.append(concrete)
        assert not empty, "dashboard expressions without data:\n" + "\n\n".join(empty)
        for rule in alert_rules.recording_rules():
            if rule["record"].endswith(("rate5m", "rate30m", "rate1h")):
                assert prom.wait_for(rule["record"], 30), f"no data: {rule['record']}"
            assert prom.query(rule["expr"]), f"no data: {rule['expr']}"
        for alert in alert_rules.alert_rules():
            prom.query(alert["expr"])  # evaluates (an error would fail the API call)
            for name in set(NAME.findall(alert["expr"])):
                assert prom.query(name), f"{alert['alert']}: no data for {name}"
