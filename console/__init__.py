"""medfed console: web pages and a JSON API over run directories, and `medfed report`."""
