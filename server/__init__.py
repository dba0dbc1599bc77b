"""medfed: server."""
