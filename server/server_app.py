"""Flower ServerApp of medfed: reads run settings, then runs :func:`run_federation`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.settings import RunSettings
from server.federation import run_federation

log = logging.getLogger("medfed.server")


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp; `settings` (from `medfed simulate`) win over Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = settings or RunSettings.from_run_config(context.run_config)
        log.info("run directory %s", run.run_dir)
        run_federation(grid, run)

    return app


# `flwr run .` entry point (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
