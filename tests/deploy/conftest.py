"""One render per CI values file for the whole test session (renders are cheap, but the
validators load big schemas: do each once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk is in the [dev] extra")

from tests.deploy import chart  # noqa: E402


@dataclass
class Render:
    name: str
    values: dict[str, Any]  # the CI file's
    merged: dict[str, Any]  # with the chart's defaults, as the templates saw them
    text: dict[str, str]  # template path -> rendered text
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    @property
    def raycluster(self) -> dict[str, Any]:
        (rc,) = self.of_kind("RayCluster")
        return rc


@pytest.fixture(scope="session")
def renders() -> dict[str, Render]:
    import helm_python as helm

    loaded = helm.Chart.load(str(chart.CHART))
    out = {}
    for path in chart.CI_VALUES:
        values = chart.load_values(path)
        text = chart.render(values)
        merged = loaded.merge_values(values)
        out[path.name] = Render(path.name, values, merged, text, chart.manifests(text))
    return out


CI_NAMES = [p.name for p in chart.CI_VALUES]
