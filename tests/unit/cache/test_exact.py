"""The exact cache's owner-side store and its key."""
import time

from tidegate.core.cache.exact import ExactStore, cache_key


def test_store_is_lru_by_bytes_with_ttl():
    s = ExactStore(max_bytes=300, ttl=0.2)
    s.put(["a" * 10, "t", {"text": "x" * 100}])
    s.put(["b" * 10, "t", {"text": "y" * 100}])
    assert s.get("a" * 10)["text"] == "x" * 100  # a is now the most recent
    s.put(["c" * 10, "u", {"text": "z" * 100}])
    assert s.get("b" * 10) is None and s.stats["evictions"] == 1
    assert s.purge("u") == 1 and s.get("c" * 10) is None
    time.sleep(0.25)
    assert s.get("a" * 10) is None and s.stats["expired"] == 1


def test_key_covers_tenant_model_and_output_parameters():
    base = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    k = cache_key("t", "m", "chat", base)
    assert k == cache_key("t", "m", "chat", dict(base, stream=True, user="someone"))  # no effect on output
    assert k != cache_key("t2", "m", "chat", base)
    assert k != cache_key("t", "m", "chat", dict(base, max_tokens=5))
    assert k != cache_key("t", "m", "chat", dict(base, stop=["x"]))
