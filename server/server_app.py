"""Flower ServerApp of medfed: reads run settings, then runs :func:`run_federation`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.settings import RunSettings
from server.federation import run_federation
from server.secagg import run_secagg

log = logging.getLogger("medfed.server")


def _log_through_flower() -> None:
    """Under `flwr run`, only Flower's logger reaches the user: send our progress there too."""
    ours = logging.getLogger("medfed")
    if not ours.handlers:
        for handler in logging.getLogger("flwr").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp; `settings` (from `medfed simulate`) win over Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if settings is None:
            _log_through_flower()
        run = settings or RunSettings.from_run_config(context.run_config)
        log.info("run directory %s", run.run_dir)
        if run.load_config().federation.privacy.secure_aggregation:
            run_secagg(grid, context, run)  # Flower's SecAgg+ needs the legacy workflow API
            return
        run_federation(grid, run)

    return app


# `flwr run .` entry point (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
