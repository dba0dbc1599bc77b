"""medfed: common."""
