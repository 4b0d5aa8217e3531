"""Prometheus recording rules and alerts for Baton's SLOs, generated as one rule file
(``deploy/helm/baton/files/prometheus/baton-rules.yaml``, by scripts/gen_monitoring.py).

Recording rules: per model, the joint SLO's missed share (``...:missed_ratio_rate<w>``),
attainment (``...:attainment_rate<w>``) and judged request rate over the windows the
SRE workbook's multiwindow, multi-burn-rate alerts use (5m, 30m, 1h, 2h, 6h, 1d, 3d).

Alerts (the workbook's table, for a 30-day budget): page when 2% of the budget burns in
an hour (1h and 5m windows over 14.4x) or 5% in six hours (6h and 30m over 6x); ticket
when 10% burns in a day (1d and 2h over 3x) or 10% in three days (3d and 6h over 1x).
Each needs a minimum volume (``MIN_REQUESTS`` judged in the long window), so a handful
of requests cannot page. Beside them: observed attainment below the plan's prediction
for 30 minutes, and KV transfers failing.
"""

from __future__ import annotations

from typing import Any

WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
SECONDS = {"5m": 300, "30m": 1800, "1h": 3600, "2h": 7200, "6h": 21600, "1d": 86400,
           "3d": 259200}  # fmt: skip
# (severity, long window, short window, burn rate, for)
BURN_ALERTS = (
    ("page", "1h", "5m", 14.4, "2m"),
    ("page", "6h", "30m", 6.0, "15m"),
    ("ticket", "1d", "2h", 3.0, "1h"),
    ("ticket", "3d", "6h", 1.0, "3h"),
)
MIN_REQUESTS = 20  # judged requests in the long window before a burn alert may fire
PLAN_MARGIN = 0.05  # attainment this far below the plan's prediction is a miss
KV_FAILURE_RATIO = 0.05

OBJECTIVE = "max by (model_name) (baton:slo_objective)"


def missed(window: str) -> str:
    return f"baton:slo_joint:missed_ratio_rate{window}"


def volume(window: str) -> str:
    return f"baton:slo_joint:requests_rate{window}"


def recording_rules() -> list[dict[str, str]]:
    rules = []
    for w in WINDOWS:
        judged = f'sum by (model_name) (rate(baton:slo_requests_total{{criterion="joint"}}[{w}]))'
        miss = (
            "sum by (model_name) "
            f'(rate(baton:slo_requests_total{{criterion="joint",result="missed"}}[{w}]))'
        )
        rules.append({"record": volume(w), "expr": judged})
        rules.append({"record": missed(w), "expr": f"{miss}\n/\n{judged}"})
        rules.append({"record": f"baton:slo_joint:attainment_rate{w}", "expr": f"1 - {missed(w)}"})
    return rules


def _burn(long: str, short: str, rate: float) -> str:
    budget = f"on (model_name) group_left () ({rate} * (1 - {OBJECTIVE}))"
    guard = f"on (model_name) ({volume(long)} * {SECONDS[long]} >= {MIN_REQUESTS})"
    return f"(\n  {missed(long)} > {budget}\nand\n  {missed(short)} > {budget}\n)\nand {guard}"


def alert_rules() -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for severity in ("page", "ticket"):
        pairs = [a for a in BURN_ALERTS if a[0] == severity]
        name = "BatonSLOErrorBudgetBurnFast" if severity == "page" else "BatonSLOErrorBudgetBurn"
        for _, long, short, rate, for_ in pairs:
            alerts.append(
                {
                    "alert": name,
                    "expr": _burn(long, short, rate),
                    "for": for_,
                    "labels": {
                        "severity": severity,
                        "long_window": long,
                        "short_window": short,
                    },  # fmt: skip
                    "annotations": {
                        "summary": f"{{{{ $labels.model_name }}}}: SLO error budget burning "
                        f"at over {rate}x ({long} and {short} windows)",
                        "description": "Requests missing the joint TTFT+TPOT SLO use up "
                        "the 30-day error budget too fast. See /dashboard.",
                    },
                }
            )
    alerts.append(
        {
            "alert": "BatonAttainmentBelowPlan",
            "expr": (
                "baton:slo_joint:attainment_rate1h\n< on (model_name) group_left ()\n"
                f"(max by (model_name) (baton:plan_predicted_attainment) - {PLAN_MARGIN})\n"
                f"and on (model_name) ({volume('1h')} * 3600 >= {MIN_REQUESTS})"
            ),
            "for": "30m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "{{ $labels.model_name }}: observed attainment below the "
                "plan's prediction",
                "description": "The running plan predicted a higher attainment than the "
                "last hour shows: the load or the profile differs from the plan's.",
            },
        }
    )
    alerts.append(
        {
            "alert": "BatonKVTransferFailures",
            "expr": (
                "sum by (model_name, backend) (rate(baton:kv_transfer_failures_total[10m]))\n"
                "/\nsum by (model_name, backend) (rate(baton:kv_transfer_seconds_count[10m]))\n"
                f"> {KV_FAILURE_RATIO}"
            ),
            "for": "5m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "{{ $labels.model_name }}: KV transfers over {{ $labels.backend }} "
                "failing",
                "description": "Over 5% of KV pulls failed in 10 minutes; decode instances "
                "recompute those prompts, which costs TTFT and prefill capacity.",
            },
        }
    )
    return alerts


def rule_file() -> dict[str, Any]:
    return {
        "groups": [
            {"name": "baton-slo-recording", "interval": "30s", "rules": recording_rules()},
            {"name": "baton-slo-alerts", "rules": alert_rules()},
        ]
    }


def expressions() -> list[str]:
    """Every expression in the file (for the check against exported metrics)."""
    return [r["expr"] for g in rule_file()["groups"] for r in g["rules"]]
