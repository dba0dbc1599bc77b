"""medfed: common datasets medmnist."""
