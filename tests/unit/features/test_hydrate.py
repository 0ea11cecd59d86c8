"""A model's inputs compiled against the declared views, and local hydration from a real
registry: declared order, defaults with their reasons, tenants apart, ttl."""
import numpy as np
import pytest

from tidegate.core.base import config
from tidegate.core.features.hydrate import Hydrator, Instance, Plan
from tidegate.core.features.registry import Registry, View

VIEWS = [{"name": "user", "entity": "user", "ttl": 0, "features": [
    {"name": "age", "dtype": "int64", "default": 30}, {"name": "spend", "dtype": "float32", "default": 1.5}]},
    {"name": "shop", "entity": "shop", "ttl": 60, "features": [{"name": "risk", "default": 0.5}]}]
EVENTS = {"clicks": {"name": "clicks", "kind": "count", "entity": "user", "default": 0}}


class EventViews:
    """The event views' read side: [(view, tenant, key)] -> values, as ViewReader.get_many answers."""
    def __init__(self, rows):
        self.rows = rows

    def get_many(self, wants):
        return [self.rows.get(w) for w in wants]


def test_plan_orders_inputs_and_names_bad_ones():
    fv = {v["name"]: View(v) for v in VIEWS}
    p = Plan(["request.amount", "user.*", "events.clicks", "shop.risk"], fv, EVENTS)
    assert p.names == ["request.amount", "user.age", "user.spend", "events.clicks", "shop.risk"]
    assert p.entity_types == ["shop", "user"] and p.request_names == ["amount"]
    np.testing.assert_array_equal(p.defaults, [0, 30, 1.5, 0, 0.5])
    for bad, why in ((["user.height"], "no feature 'height'"), (["events.nope"], "no event view"),
                     (["orders.x"], "not request, events or a feature view"), (["user.age", "user.*"], "twice"),
                     ([], "non-empty")):
        with pytest.raises(ValueError, match=why):
            Plan(bad, fv, EVENTS)


def test_local_hydration_reads_rows_and_says_why_it_defaulted(tmp_path):
    reg = Registry(str(tmp_path), VIEWS, writable=True)
    reg.load("user", [("u1", {"age": 41, "spend": 9.25})], "acme")
    reg.load("shop", [("s1", {"risk": 0.9})], "acme")
    reg.close()
    reader = Registry(str(tmp_path), VIEWS)
    fv = reader.views
    plan = Plan(["request.amount", "user.*", "shop.risk", "events.clicks"], fv, EVENTS)
    h = Hydrator(reader, EventViews({("clicks", "acme", "u1"): 4}), None, {"critical": 0.002})
    batch = [Instance("acme", {"user": "u1", "shop": "s1"}, {"amount": 12.0}),
             Instance("acme", {"user": "u2", "shop": "s1"}, {"amount": 1.0}),
             Instance("globex", {"user": "u1", "shop": "s1"}, {"amount": 2.0})]  # another tenant: sees nothing
    X, reasons = h.local(plan, batch)
    np.testing.assert_allclose(X[0], [12, 41, 9.25, 0.9, 4])
    assert reasons[0] == {}
    np.testing.assert_allclose(X[1], [1, 30, 1.5, 0.9, 0])
    assert reasons[1] == {"user.age": "missing", "user.spend": "missing", "events.clicks": "missing"}
    np.testing.assert_allclose(X[2], [2, 30, 1.5, 0.5, 0])
    assert set(reasons[2].values()) == {"missing"} and len(reasons[2]) == 4
    # past the shop view's ttl its rows read as expired
    assert reader.fetch([("acme", "shop", "s1")], now=__import__("time").time() + 61)[0][0] == b""
    reader.close()


def test_model_inputs_are_checked_against_the_config(tmp_path):
    from tidegate.workers import CONFIG_RULES
    lr = tmp_path / "lr.npz"
    np.savez(lr, w=np.ones(2, np.float32), b=np.float32(0))
    raw = {"features": {"views": VIEWS}, "predict": {"models": [{"name": "m", "path": str(lr),
                                                                 "inputs": ["request.x", "user.nope"]}]}}
    with pytest.raises(config.ConfigError, match="predict.models: model 'm': input 'user.nope'"):
        config.validate(raw, CONFIG_RULES)
    raw["predict"]["models"][0]["inputs"] = ["request.x", "user.age"]
    assert config.validate(raw, CONFIG_RULES)["predict"]["models"][0]["name"] == "m"
    raw["features"]["views"] = [dict(VIEWS[0], source="redis")]
    with pytest.raises(config.ConfigError, match="redis_url"):
        config.validate(raw, CONFIG_RULES)
