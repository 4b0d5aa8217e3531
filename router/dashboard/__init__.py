"""The built-in SLO page (``/dashboard``) and its JSON (``/api/v1/slo``).

The page is static (``static/``: HTML, one script, one stylesheet; no library, no CDN,
charts drawn as SVG) and reads everything from the JSON endpoint, which the router
computes from its live windows (``router.slo.SLOWindows``) and the last cluster status.

Access: with an API key set, the page and the JSON need it. Scripts send
``Authorization: Bearer KEY``; a browser posts the key once to ``/dashboard/login``
(a form, so the key never appears in a URL) and gets a random session cookie
(HttpOnly, SameSite=Strict). Without either: 401, the login form, and no data. Every
answer carries a strict Content-Security-Policy: nothing but this origin's own script,
style and JSON.
"""

from __future__ import annotations

import hmac
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.errors import ErrorKind, RouterError
from router.instance_metrics import instance_node, kv_cache_usage
from router.slo import WINDOWS, parse_window

if TYPE_CHECKING:
    from router.metrics import RouterMetrics
    from router.service import Router

# The paths that check access themselves (the API key middleware lets them through).
PREFIXES = ("/dashboard", "/api/v1/slo")
COOKIE = "baton_dashboard"
SESSION_S = 12 * 3600
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text("utf-8")


class Dashboard:
    def __init__(self, router: Router, metrics: RouterMetrics, api_key: str | None):
        self.router = router
        self.metrics = metrics
        self.api_key = api_key
        self._sessions: dict[str, float] = {}  # token -> expiry (monotonic)
        self._steps: dict[str, tuple[float, float]] = {}  # instance -> (steps, seconds)

    # -- access ------------------------------------------------------------------------

    def allowed(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return True
        token = request.cookies.get(COOKIE, "")
        expiry = self._sessions.get(token)
        return expiry is not None and expiry > time.monotonic()

    def _login_page(self, message: str, status: int) -> web.Response:
        html = _static("login.html").replace("{message}", message)
        return web.Response(
            text=html, status=status, content_type="text/html", headers=SECURITY_HEADERS
        )

    async def page(self, request: web.Request) -> web.Response:
        if not self.allowed(request):
            return self._login_page("This dashboard needs the server's API key.", 401)
        return web.Response(
            text=_static("index.html"), content_type="text/html", headers=SECURITY_HEADERS
        )

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        key = str(form.get("key", ""))
        if self.api_key is None or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return self._login_page("Wrong key.", 401)
        now = time.monotonic()
        self._sessions = {t: e for t, e in self._sessions.items() if e > now}
        token = secrets.token_urlsafe(32)
        self._sessions[token] = now + SESSION_S
        response = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": "/dashboard"})
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="Strict", path="/", max_age=SESSION_S
        )
        return response

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise RouterError(ErrorKind.NOT_FOUND, f"path: no file {name!r}", "path")
        return web.Response(text=_static(name), content_type=STATIC[name], headers=SECURITY_HEADERS)

    # -- data --------------------------------------------------------------------------

    async def api(self, request: web.Request) -> web.Response:
        if not self.allowed(request):
            raise RouterError(
                ErrorKind.UNAUTHENTICATED,
                "api_key: missing or wrong API key (send 'Authorization: Bearer <key>')",
                "api_key",
            )
        try:
            chosen = request.query.get("window")
            windows = [chosen] if chosen is not None else list(WINDOWS)
            spans = {w: parse_window(w) for w in windows}
        except ValueError as e:
            raise RouterError.invalid(str(e), "window") from e
        model = request.query.get("model") or None
        await self.metrics.refresh(self.router)
        w = self.metrics.windows
        name = self.router.model_name
        targets = self.metrics.targets.get(name)
        prediction = self.metrics.predictions.get(name)
        body: dict[str, Any] = {
            "model": name,
            "models": [m.id for m in self.router.models()],
            "time": w.clock(),
            "targets": None if targets is None else targets.to_dict(),
            "plan": None if prediction is None else prediction.to_dict(),
            "windows": {k: w.summary(v, model) for k, v in spans.items()},
            "series": w.series(600.0, 10.0, model),
            "kv_transfer": w.kv_transfer(spans[windows[-1]], model),
            "instances": self._instances(),
            "misses": w.misses(model, limit=25),
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    def _instances(self) -> list[dict[str, Any]]:
        view = self.metrics.instances.view
        rows = []
        seen = set()
        for s in view.instances:
            seen.add(s.name)
            steps, seconds = s.counters.get("steps", 0.0), s.counters.get("step_seconds", 0.0)
            before = self._steps.get(s.name, (0.0, 0.0))
            self._steps[s.name] = (steps, seconds)
            d_steps, d_seconds = steps - before[0], seconds - before[1]
            rows.append(
                {
                    "name": s.name,
                    "role": s.role,
                    "node": instance_node(s),
                    "state": view.states.get(s.name, "ready"),
                    "waiting": s.num_waiting,
                    "running": s.num_running,
                    "kv_usage": kv_cache_usage(s),
                    # Mean step since the last reading; the lifetime mean when idle since.
                    "step_ms": 1e3
                    * (
                        d_seconds / d_steps
                        if d_steps > 0
                        else (seconds / steps if steps > 0 else 0.0)
                    ),  # fmt: skip
                }
            )
        for name, state in view.states.items():  # restarting or dead: no stats
            if name not in seen:
                rows.append({"name": name, "role": view.roles.get(name, ""), "node": "",
                             "state": state, "waiting": None, "running": None,
                             "kv_usage": None, "step_ms": None})  # fmt: skip
        return rows


def add_routes(app: web.Application, router: Router, metrics: RouterMetrics | None,
               api_key: str | None) -> None:  # fmt: skip
    """Mount the page and the JSON; nothing when the server keeps no metrics."""
    if metrics is None:
        return
    d = Dashboard(router, metrics, api_key)
    app.add_routes(
        [
            web.get("/dashboard", d.page),
            web.post("/dashboard/login", d.login),
            web.get("/dashboard/static/{name}", d.static),
            web.get("/api/v1/slo", d.api),
        ]
    )
