"""Baton's Grafana dashboards, generated from one list of panels per dashboard (plain
Python, Grafana's JSON model), written by scripts/gen_monitoring.py to
``deploy/helm/baton/files/grafana/*.json`` and checked for drift by the tests. Every
expression may name only series ``router.metrics`` exports (a test checks that, and a
real Prometheus evaluates each one).

Variables: ``$datasource`` (a Prometheus) and ``$model`` (the served model names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

M = 'model_name=~"$model"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (expression, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""


def _quantiles(metric: str, by: str = "") -> tuple[tuple[str, str], ...]:
    group = f"le{', ' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple(
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{M}}}[{RATE}])))",
            f"{legend}p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    )


def _target(criterion: str) -> tuple[str, str]:
    return (f'max(baton:slo_target_seconds{{{M}, criterion="{criterion}"}})', "target")


def _attainment(criterion: str) -> str:
    met = f'rate(baton:slo_requests_total{{{M}, criterion="{criterion}", result="met"}}[{RATE}])'
    judged = f'rate(baton:slo_requests_total{{{M}, criterion="{criterion}"}}[{RATE}])'
    return f"sum({met}) / sum({judged})"


OVERVIEW = (
    Panel(
        "Joint SLO attainment vs objective and plan",
        (
            (_attainment("joint"), "joint (TTFT and TPOT)"),
            (_attainment("ttft"), "TTFT"),
            (_attainment("tpot"), "TPOT"),
            (f"max(baton:slo_objective{{{M}}})", "objective"),
            (f"max(baton:plan_predicted_attainment{{{M}}})", "plan prediction"),
        ),
        "percentunit",
        description="Share of requests finished ok that met the SLO, per criterion.",
    ),
    Panel(
        "Error budget left (1h)",
        (
            (
                f"1 - (1 - ({_attainment('joint').replace(RATE, '1h')})) "
                f"/ (1 - max(baton:slo_objective{{{M}}}))",
                "budget left",
            ),
        ),
        "percentunit",
        "stat",
    ),
    Panel(
        "Goodput and throughput",
        (
            (
                f'sum(rate(baton:slo_requests_total{{{M}, criterion="joint", result="met"}}'
                f"[{RATE}]))",
                "goodput (met both SLOs)",
            ),
            (f'sum(rate(baton:requests_total{{{M}, outcome="ok"}}[{RATE}]))', "finished ok"),
            (f"max(baton:plan_max_goodput_rps{{{M}}})", "plan max goodput"),
        ),
        "reqps",
    ),
    Panel(
        "Requests by outcome",
        ((f"sum by (outcome) (rate(baton:requests_total{{{M}}}[{RATE}]))", "{{outcome}}"),),
        "reqps",
    ),
    Panel(
        "TTFT p50 / p90 / p99 vs target",
        (*_quantiles("baton:time_to_first_token_seconds"), _target("ttft")),
        "s",
    ),
    Panel(
        "TPOT (per request) p50 / p90 / p99 vs target",
        (*_quantiles("baton:time_per_output_token_seconds"), _target("tpot")),
        "s",
    ),
    Panel(
        "Inter-token latency (per token) p50 / p90 / p99",
        _quantiles("baton:inter_token_latency_seconds"),
        "s",
    ),
    Panel(
        "TTFT breakdown (mean per request)",
        (
            (
                f"sum by (component) (rate(baton:ttft_breakdown_seconds_sum{{{M}}}[{RATE}]))\n/\n"
                f"sum by (component) (rate(baton:ttft_breakdown_seconds_count{{{M}}}[{RATE}]))",
                "{{component}}",
            ),
        ),
        "s",
        description="router_queue + prefill_queue + prefill_compute make the TTFT; the KV "
        "transfer and the first decode step come before the second token.",
    ),
)


def _per_instance(metric: str, role: str) -> tuple[str, str]:
    return (f'{metric}{{{M}, role="{role}"}}', "{{instance_name}} ({{node}})")


def _step_time(role: str) -> tuple[str, str]:
    sel = f'{{{M}, role="{role}"}}'
    return (
        f"rate(baton:instance_step_seconds_total{sel}[{RATE}])\n/\n"
        f"rate(baton:instance_steps_total{sel}[{RATE}])",
        "{{instance_name}}",
    )


def _role_panels(role: str) -> tuple[Panel, ...]:
    return (
        Panel(f"{role}: waiting", (_per_instance("baton:num_requests_waiting", role),)),
        Panel(f"{role}: running", (_per_instance("baton:num_requests_running", role),)),
        Panel(
            f"{role}: KV cache usage",
            (_per_instance("baton:kv_cache_usage_perc", role),),
            "percentunit",
        ),
        Panel(f"{role}: step time", (_step_time(role),), "s"),
        Panel(
            f"{role}: instances by state",
            (
                (
                    f'sum by (state) (baton:instance_state{{{M}, role="{role}"}} == 1)',
                    "{{state}}",
                ),
            ),
            kind="stat",
        ),
    )


PER_ROLE = _role_panels("prefill") + _role_panels("decode")

KV_TRANSFER = (
    Panel(
        "KV pull time p50 / p99 by backend",
        tuple(q for q in _quantiles("baton:kv_transfer_seconds", "backend") if "0.9," not in q[0]),
        "s",
    ),
    Panel(
        "KV bytes pulled per second by backend",
        (
            (
                f"sum by (backend) (rate(baton:kv_transfer_bytes_total{{{M}}}[{RATE}]))",
                "{{backend}}",
            ),
        ),
        "Bps",
    ),
    Panel(
        "KV pull failures per second by backend",
        (
            (
                f"sum by (backend) (rate(baton:kv_transfer_failures_total{{{M}}}[{RATE}]))",
                "{{backend}}",
            ),
        ),
        "reqps",
    ),
    Panel(
        "Mean KV pull over mean TTFT",
        (
            (
                f"(sum by (backend) (rate(baton:kv_transfer_seconds_sum{{{M}}}[{RATE}]))\n"
                f"/ sum by (backend) (rate(baton:kv_transfer_seconds_count{{{M}}}[{RATE}])))\n"
                f"/ on () group_left ()\n"
                f"(sum(rate(baton:time_to_first_token_seconds_sum{{{M}}}[{RATE}]))\n"
                f"/ sum(rate(baton:time_to_first_token_seconds_count{{{M}}}[{RATE}])))",
                "{{backend}}",
            ),
        ),
        "percentunit",
    ),
)


def _ratio(observed: str, predicted: str, legend: str) -> tuple[str, str]:
    return (f"({observed})\n/\nmax(baton:plan_{predicted}{{{M}}})", legend)


def _mean(counter: str) -> str:
    return (
        f"sum(rate(baton:{counter}_total{{{M}}}[{RATE}]))\n/ "
        f'sum(rate(baton:requests_total{{{M}, outcome="ok"}}[{RATE}]))'
    )


PLANNER = (
    Panel(
        "Observed / predicted (correction factors; 1 = as planned)",
        (
            _ratio(_attainment("joint"), "predicted_attainment", "attainment"),
            _ratio(
                f'sum(rate(baton:requests_total{{{M}, outcome="ok"}}[{RATE}]))',
                "rate_rps",
                "request rate",
            ),
            _ratio(_mean("prompt_tokens"), "mean_prompt_tokens", "prompt length"),
            _ratio(_mean("generation_tokens"), "mean_output_tokens", "output length"),
            _ratio(
                f'sum(rate(baton:slo_requests_total{{{M}, criterion="joint", result="met"}}'
                f"[{RATE}]))",
                "max_goodput_rps",
                "goodput / plan max",
            ),
        ),
        description="Below 1 on attainment with rate and lengths near 1: the profile is "
        "optimistic; rate or lengths above 1: the load differs from the plan's.",
    ),
    *(
        Panel(
            f"{name}: observed and planned p90 / p99",
            (
                *_quantiles(f"baton:{histogram}")[1:],
                *(
                    (
                        f'max(baton:plan_predicted_{metric}_seconds{{{M}, quantile="{q}"}})',
                        f"plan {label}",
                    )
                    for q, label in (("0.9", "p90"), ("0.99", "p99"))
                ),
            ),
            "s",
            description=f"The plan's {name} percentiles, simulated at its rate, beside the "
            "live ones from the histogram.",
        )
        for name, metric, histogram in (
            ("TTFT", "ttft", "time_to_first_token_seconds"),
            ("TPOT", "tpot", "time_per_output_token_seconds"),
        )
    ),
    Panel(
        "Plan predictions",
        (
            (f"max(baton:plan_predicted_attainment{{{M}}})", "attainment"),
            (f"max(baton:plan_rate_rps{{{M}}})", "rate (req/s)"),
            (f"max(baton:plan_max_goodput_rps{{{M}}})", "max goodput (req/s)"),
        ),
        kind="stat",
    ),
)

DASHBOARDS = {
    "baton-overview": ("Baton / SLO overview", OVERVIEW),
    "baton-roles": ("Baton / per role", PER_ROLE),
    "baton-kv-transfer": ("Baton / KV transfer", KV_TRANSFER),
    "baton-planner": ("Baton / planner fidelity", PLANNER),
}


def _panel_json(i: int, p: Panel) -> dict[str, Any]:
    width = 12 if p.kind == "timeseries" else 6
    per_row = 24 // width
    return {
        "id": i + 1,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": (i % per_row) * width, "y": (i // per_row) * 8},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + k),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }  # fmt: skip
            for k, (expr, legend) in enumerate(p.targets)
        ],
    }


def dashboard(uid: str) -> dict[str, Any]:
    title, panels = DASHBOARDS[uid]
    return {
        "uid": uid,
        "title": title,
        "tags": ["baton"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(baton:requests_total, model_name)",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "allValue": ".*",
                },
            ]
        },
        "panels": [_panel_json(i, p) for i, p in enumerate(panels)],
    }


def expressions() -> list[str]:
    return [e for _, panels in DASHBOARDS.values() for p in panels for e, _ in p.targets]


def concrete(expr: str, rate: str = "1m") -> str:
    """An expression as Prometheus evaluates it for all models."""
    return expr.replace(RATE, rate).replace("$model", ".*")
