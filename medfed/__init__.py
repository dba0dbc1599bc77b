"""medfed: medfed."""
