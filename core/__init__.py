"""Pure logic that the worker processes compose: config, protocol, HTTP framing, metrics."""

__version__ = "0.1.0"
