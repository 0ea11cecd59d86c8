"""batcher.choose: where a sequence's cached prompt prefix comes from, one case per tier. The
most blocks wins; at a tie the cheaper tier (live KV in place, a KV copy, RAM, then disk)."""
from tidegate.core.llm.batcher import Plan, choose

NONE = (0, None)


def test_live_its_own_slot_in_place():
    assert choose(4, (4, "slot B"), (3, 9), (4, "ram"), (4, "disk")) == Plan("live", 4, None)


def test_slot_copied_from_another_slot():
    assert choose(1, (5, "slot B"), (2, 9), (5, "ram"), NONE) == Plan("slot", 5, "slot B")


def test_park_a_parked_kv_when_it_holds_more_than_any_slot():
    assert choose(0, (2, "slot B"), (6, 9), (6, "ram"), (6, "disk")) == Plan("park", 6, 9)


def test_ram_a_saved_state_longer_than_any_kv():
    assert choose(2, (3, "slot B"), (1, 9), (7, "ram key"), (7, "disk key")) == Plan("ram", 7, "ram key")


def test_disk_when_only_disk_holds_more():
    assert choose(2, (3, "slot B"), NONE, (4, "ram key"), (8, "disk key")) == Plan("disk", 8, "disk key")


def test_none_when_nothing_is_cached():
    assert choose(0, NONE, NONE, NONE, NONE) == Plan("none", 0, None)
