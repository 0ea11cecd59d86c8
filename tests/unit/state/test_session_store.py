"""SessionStore: write-through durability, sliding expiry, attribute patches, bounds."""
import time

import pytest

from tidegate.core.state.sessions import SessionStore, new_token, token_id


def test_token_is_long_random_and_only_its_hash_is_stored(tmp_path):
    t1, t2 = new_token(), new_token()
    assert t1 != t2 and t1.startswith(b"tgs-") and len(t1) >= 4 + 43  # 256 bits of base64url
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10)
    sid = token_id(t1)
    s.create(sid, "acme", "u1", "k1", "standard", {"a": 1})
    s.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "s").iterdir())
    assert t1 not in raw and sid.encode() in raw


def test_survives_reopen_and_patch_delete(tmp_path):
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10)
    s.create("a" * 64, "acme", "u1", "k1", "standard", {"lang": "en", "x": 1})
    s.patch("a" * 64, {"lang": "fr", "x": None, "new": [1, 2]})
    s.create("b" * 64, "acme", "u2", "k1", "standard", {})
    s.delete("b" * 64)
    s.close()
    s2 = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10)
    assert s2.get("a" * 64)["attributes"] == {"lang": "fr", "new": [1, 2]}
    assert s2.get("b" * 64) is None


def test_sliding_expiry_and_expired_sessions_vanish(tmp_path):
    s = SessionStore(str(tmp_path / "s"), ttl=0.3, max_sessions=10)
    s.create("a" * 64, "t", "u", "k", "standard", {})
    for _ in range(4):  # used every 0.15 s: stays alive past its first ttl
        time.sleep(0.15)
        assert s.get("a" * 64) is not None
    time.sleep(0.4)
    assert s.get("a" * 64) is None
    s.close()
    assert SessionStore(str(tmp_path / "s"), ttl=0.3, max_sessions=10).live == {}


def test_bounded(tmp_path):
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=2)
    s.create("a" * 64, "t", "u", "k", "standard", {})
    s.create("b" * 64, "t", "u", "k", "standard", {})
    with pytest.raises(OverflowError):
        s.create("c" * 64, "t", "u", "k", "standard", {})


def test_patch_cannot_grow_a_record_past_the_limit(tmp_path):
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10, max_attributes_bytes=100)
    sid = token_id(new_token())
    s.create(sid, "acme", "u1", "k1", "standard", {})
    for i in range(3):
        s.patch(sid, {f"k{i}": "x" * 20})
    with pytest.raises(ValueError):
        s.patch(sid, {"k9": "x" * 20})  # each patch is small; the merged record would not be
    assert len(s.get(sid)["attributes"]) == 3


def test_a_full_map_grows_then_refuses_and_touches_never_fail(tmp_path):
    from tidegate.core.state.sessions import SessionsFull
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10 ** 6, max_map_bytes=1 << 20,
                     max_attributes_bytes=1 << 16)
    first = token_id(new_token())
    s.create(first, "acme", "u", "k", "standard", {})
    with pytest.raises(SessionsFull):
        for _ in range(10 ** 5):
            s.create(token_id(new_token()), "acme", "u", "k", "standard", {"pad": "x" * 4000})
    s._persisted_expiry[first] = 0  # force the next touch to write
    assert s.get(first) is not None  # a touch on a full store still answers


def test_sessions_that_expire_together_go_in_batches_of_one_transaction_without_a_sync(tmp_path):
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10000)
    for i in range(2500):
        s.create(f"{i:064d}", "t", "u", "k", "standard", {})
        s.live[f"{i:064d}"]["expires_at"] = 0.0  # expired together (as if created together long ago)
    real = s.env

    class Counting:  # the environment, counting write transactions and syncs
        writes = syncs = 0

        def begin(self, write=False, **kw):
            Counting.writes += write
            return real.begin(write=write, **kw)

        def sync(self, *a):
            Counting.syncs += 1
            return real.sync(*a)
    s.env = Counting()
    assert [s.expire(1000), s.expire(1000), s.expire(1000), s.expire(1000)] == [1000, 1000, 500, 0]
    assert Counting.writes == 3 and Counting.syncs == 0 and not s.live
    s.env = real
    s.close()
    again = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=10)
    with again.env.begin() as txn:
        assert txn.stat()["entries"] == 0  # gone from disk too
    again.close()


def test_one_key_holds_at_most_its_share_of_an_owners_sessions(tmp_path):
    from tidegate.core.state.sessions import KEY_FULL
    s = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=100, max_per_key=3)
    ops = s.handlers()
    create = ops["sess.create"]
    made = [create({"sid": f"{i:064d}", "tenant": "t", "user": "u", "key_id": "k1", "class": "standard",
                    "attributes": {}}) for i in range(4)]
    assert [m == KEY_FULL for m in made] == [False, False, False, True]
    assert create({"sid": "f" * 64, "tenant": "t2", "user": "u", "key_id": "k2", "class": "standard",
                   "attributes": {}})["tenant"] == "t2"  # another key is not refused
    s.delete(f"{0:064d}")
    assert create({"sid": "e" * 64, "tenant": "t", "user": "u", "key_id": "k1", "class": "standard",
                   "attributes": {}}) != KEY_FULL  # a freed place is the key's again
    s.close()
    again = SessionStore(str(tmp_path / "s"), ttl=60, max_sessions=100, max_per_key=3)
    assert again.per_key == {"k1": 3, "k2": 1}  # counted again from the store
    again.close()
