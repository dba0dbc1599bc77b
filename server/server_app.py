"""Flower ServerApp of medfed: reads run settings, then runs :func:`run_federation`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.settings import RunSettings
from server.federation import run_federation
from server.provisioning import RunStopped
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


class StopWithoutTraceback(logging.Filter):
    """A run medfed stopped on purpose (too few valid updates, nothing published) ends in one
    sentence, not in the traceback Flower logs for any exception the ServerApp raises; the run
    still ends `finished:failed`."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RunStopped):
            record.msg, record.args = "run stopped: %s", (str(exc),)
            record.exc_info, record.exc_text = None, None
        return True


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp; `settings` (from `medfed simulate`) win over Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if settings is None:
            _log_through_flower()
            flwr_logger = logging.getLogger("flwr")
            if not any(isinstance(f, StopWithoutTraceback) for f in flwr_logger.filters):
                flwr_logger.addFilter(StopWithoutTraceback())
        run = settings or RunSettings.from_run_config(context.run_config)
        log.info("run directory %s", run.run_dir)
        if run.load_config().federation.privacy.secure_aggregation:
            run_secagg(grid, context, run)  # Flower's SecAgg+ needs the legacy workflow API
            return
        run_federation(grid, run)

    return app


# `flwr run .` entry point (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
