"""API keys the system tests configure: two keys of tenant acme, one critical key of globex."""
from tidegate.core.state.auth import hash_key

ALPHA, BETA, GAMMA = "sk-test-alpha-0123456789", "sk-test-beta-0123456789", "sk-test-gamma-0123456789"
KEYS = [{"key_sha256": hash_key(ALPHA), "tenant": "acme", "name": "alpha"},
        {"key_sha256": hash_key(BETA), "tenant": "acme", "name": "beta"},
        {"key_sha256": hash_key(GAMMA), "tenant": "globex", "name": "gamma", "class": "critical"}]
