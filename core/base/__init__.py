"""Ground layer: config, JSON logging, metrics, sd_notify. Imports no other core package (ext only)."""
