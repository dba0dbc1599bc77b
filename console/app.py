"""The federation console: a read-only FastAPI app over run directories (pages and /api/).

Pages (HTML, server-rendered; the only script is the package's own live-update poller)::

    /                                  runs
    /runs/{run}                        rounds, charts, sites, privacy, validation, config
    /runs/{run}/hospitals              registered, last heard from, refused joins, rounds
    /runs/{run}/versions               registry versions, best/latest, signature status
    /runs/{run}/versions/{v}           model card
    /runs/{run}/versions/{v}/files/{f} download one bundle file
    /runs/{run}/audit?site=&round=     what each hospital sent

The same data as JSON under /api/ (`/api/runs`, `/api/runs/{run}`, `/api/runs/{run}/status`,
`.../hospitals`, `.../versions`, `.../audit`). `medfed console` serves it on loopback;
`medfed server` mounts it under /console of its registry server, behind the same mutual TLS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from console import pages, runs

_FILES = ("manifest.json", "manifest.sig", "backbone.safetensors", "head.safetensors",
          "site_stats.json")
_ROUND = re.compile(r"\d{1,6}")
# Every answer, page or file: the pages use only the console's own stylesheet and script, so a
# value that slipped past escaping still could not run a script, load from elsewhere or frame
# the console; a downloaded bundle file is never sniffed into a page.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self'; connect-src 'self'; form-action 'self'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(root: Path, public_key: Path | None = None, prefix: str = "") -> FastAPI:
    """The console over the run directories under `root` (or `root` itself when it is a run);
    `prefix` is where it is mounted, for the links it draws."""
    root = Path(root)
    links = pages.Links(prefix)
    app = FastAPI(title="medfed console", docs_url=None, redoc_url=None, openapi_url=None)
    static = Path(__file__).with_name("static")
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def run_dir(name: str) -> Path:
        try:
            return runs.find_run(root, name)
        except runs.UnknownRun as err:
            raise HTTPException(404, str(err)) from err

    def key_for(path: Path) -> Path | None:
        return runs.public_key_for(path, public_key)

    def round_arg(value: str | None) -> int | None:
        if value in (None, ""):
            return None
        if not _ROUND.fullmatch(value):
            raise HTTPException(404, f"round {value!r} is not a round number")
        return int(value)

    def version_arg(value: str) -> int:
        if not re.fullmatch(r"\d{1,9}", value):
            raise HTTPException(404, f"{value!r} is not a version number")
        return int(value)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/") or "/api/" in request.url.path:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return HTMLResponse(pages.error_page(str(exc.detail), links), status_code=exc.status_code)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    # --- JSON API ----------------------------------------------------------------------------
    @app.get("/api/runs")
    def api_runs() -> dict[str, Any]:
        return {"runs": runs.list_runs(root)}

    @app.get("/api/runs/{name}")
    def api_run(name: str) -> dict[str, Any]:
        return runs.read_run(run_dir(name), name).to_json()

    @app.get("/api/runs/{name}/status")
    def api_status(name: str) -> dict[str, Any]:
        path = run_dir(name)
        view = runs.read_run(path, name)
        return {"status": view.status, "rounds_done": view.rounds_done}

    @app.get("/api/runs/{name}/versions")
    def api_versions(name: str) -> dict[str, Any]:
        path = run_dir(name)
        return runs.versions(path, key_for(path))

    @app.get("/api/runs/{name}/hospitals")
    def api_hospitals(name: str) -> dict[str, Any]:
        return runs.hospitals(run_dir(name))

    @app.get("/api/runs/{name}/audit")
    def api_audit(name: str, site: str | None = None, round: str | None = None
                  ) -> dict[str, Any]:
        return runs.audit(run_dir(name), site or None, round_arg(round))

    # --- pages -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> str:
        # served under the registry (a prefix), hospitals see it: no server path, only a name
        return pages.runs_page(runs.list_runs(root), links, root.name if prefix else str(root))

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str) -> str:
        view = runs.read_run(run_dir(name), name)
        return pages.run_page(view, links, links.href(f"/api/runs/{name}/status"))

    @app.get("/runs/{name}/versions", response_class=HTMLResponse)
    def versions_page(name: str) -> str:
        path = run_dir(name)
        view = runs.read_run(path, name)
        return pages.versions_page(name, runs.versions(path, key_for(path)), links,
                                   view.best_metric)

    @app.get("/runs/{name}/versions/{version}", response_class=HTMLResponse)
    def version_page(name: str, version: str) -> str:
        from client.model_card import model_card

        path = run_dir(name)
        try:
            vdir = runs.version_dir(path, version_arg(version))
        except runs.UnknownRun as err:
            raise HTTPException(404, str(err)) from err
        key = key_for(path)
        signature = runs.signature_status(vdir, key)
        card = (model_card(vdir, key) if signature == "verified" else
                "No model card: the version's signature and hashes could not be verified.")
        return pages.version_page(name, int(version), card, signature, links)

    @app.get("/runs/{name}/versions/{version}/files/{file}")
    def version_file(name: str, version: str, file: str) -> Response:
        path = run_dir(name)
        if file not in _FILES:  # an allow-list: no other file is reachable
            raise HTTPException(404, f"no bundle file {file!r}; expected one of "
                                     f"{', '.join(_FILES)}")
        try:
            vdir = runs.version_dir(path, version_arg(version))
        except runs.UnknownRun as err:
            raise HTTPException(404, str(err)) from err
        target = vdir / file
        if target.is_symlink() or not target.is_file():
            raise HTTPException(404, f"version {version} has no file {file}")
        return FileResponse(target, filename=file, media_type="application/octet-stream")

    @app.get("/runs/{name}/hospitals", response_class=HTMLResponse)
    def hospitals_page(name: str) -> str:
        return pages.hospitals_page(name, runs.hospitals(run_dir(name)), links)

    @app.get("/runs/{name}/audit", response_class=HTMLResponse)
    def audit_page(name: str, site: str | None = None, round: str | None = None) -> str:
        rnd = round_arg(round)
        return pages.audit_page(name, runs.audit(run_dir(name), site or None, rnd), links,
                                site or None, rnd)

    return app
