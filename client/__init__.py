"""medfed: client."""
