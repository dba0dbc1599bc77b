"""medfed: common datasets."""
