"""/dashboard in a real browser on a real `baton serve` with traffic: it asks for the key,
every panel draws with data, nothing is requested outside the page's origin, no console
error; the screenshot is kept as a test artifact."""

from __future__ import annotations

import json
import time

from tests.observability import served as served_mod
from tests.observability.chromium import artifacts_dir, browser

PANELS = ("attainment", "goodput", "ttft", "tpot", "breakdown", "kv", "instances", "misses")


def test_dashboard_in_chromium(served: served_mod.Served) -> None:
    origin = served.http
    with browser() as b, served_mod.Load(served):
        context = b.new_context(viewport={"width": 1440, "height": 1300})
        # Without the key: 401, the login form, no panel. (This page logs the 401 as a
        # failed resource, so the console is checked on the page opened after login.)
        login = context.new_page()
        first = login.goto(f"{origin}/dashboard")
        assert first is not None and first.status == 401
        assert login.locator("input[name=key]").count() == 1
        assert login.locator("[data-panel]").count() == 0
        login.fill("input[name=key]", served_mod.KEY)
        with login.expect_navigation():
            login.click("button[type=submit]")
        assert login.url == f"{origin}/dashboard"  # the key never in the URL
        login.close()

        page = context.new_page()  # the session cookie is the context's
        requests: list[str] = []
        errors: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400
                else None)  # fmt: skip
        shown = page.goto(f"{origin}/dashboard")
        assert shown is not None and shown.status == 200
        page.wait_for_selector("body[data-loaded='1']", timeout=30_000)
        deadline = time.monotonic() + 120
        missing: list[str] = list(PANELS)
        while missing and time.monotonic() < deadline:
            missing = [
                p for p in PANELS
                if page.get_attribute(f"[data-panel={p}]", "data-has-data") != "1"
            ]  # fmt: skip
            page.wait_for_timeout(1000)
        assert not missing, f"panels without data: {missing}"
        # The plan's simulated percentiles beside the live ones (served runs a --plan).
        status, body = served.request("GET", "/api/v1/slo")
        assert status == 200
        plan = json.loads(body)["plan"]
        for metric in ("ttft", "tpot"):
            assert plan[f"{metric}_s"]["p90"] is not None  # all served in the plan's simulation
            assert page.locator(f"#{metric} line.plan-ref").count() == 1
            legend = page.text_content(f"#{metric} .plan-pred") or ""
            assert legend.startswith("plan p50 / p90 / p99 "), legend
        page.wait_for_timeout(2500)  # one more refresh, so the charts carry several points
        page.screenshot(path=str(artifacts_dir() / "dashboard.png"), full_page=True)

    outside = [u for u in requests if not u.startswith(origin + "/")]
    assert not outside, f"requests outside {origin}: {outside}"
    assert not errors, f"console errors: {errors}"
    assert served.request("GET", "/dashboard", headers={"Authorization": ""})[0] == 401
