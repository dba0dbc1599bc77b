"""medfed: common datasets heart_disease."""
