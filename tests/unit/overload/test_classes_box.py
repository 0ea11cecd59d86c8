"""Which class a request is (model, then route, then key, then tenant, then the default) and the
box-level overload watch (thresholds, hysteresis)."""
from tidegate.core.base import config
from tidegate.core.overload.box import BoxWatch
from tidegate.core.overload.classes import Classes
from tidegate.core.state.auth import ApiKeys, hash_key


def cfg_with(**classes):
    cfg = config.validate({"classes": classes})
    return cfg


def test_model_then_route_then_caller_then_default():
    c = Classes(cfg_with(routes={"/v1/predict": "standard", "/v1/predict/recommend": "background"},
                         default="background"))
    req = "/v1/predict/recommend/batch"
    assert c.of(req, "critical", "critical") == "critical"       # the model's own class first
    assert c.of(req, "critical") == "background"                 # the longest route prefix
    assert c.of("/v1/predict/fraud", "critical") == "standard"
    assert c.of("/v1/chat/completions", "critical") == "critical"  # the caller's
    assert c.of("/v1/chat/completions", "") == "background"       # anonymous: default


def test_keys_take_their_class_then_their_tenants_then_the_default():
    cfg = cfg_with(tenants={"vip": "critical"}, default="background")
    keys = ApiKeys([{"key_sha256": hash_key("a"), "tenant": "vip", "name": "a"},
                    {"key_sha256": hash_key("b"), "tenant": "vip", "name": "b", "class": "standard"},
                    {"key_sha256": hash_key("c"), "tenant": "other", "name": "c"}], cfg["classes"])
    assert [keys.authenticate(k).klass for k in (b"a", b"b", b"c")] == ["critical", "standard", "background"]


def test_config_refuses_unknown_classes_kinds_and_actions():
    for raw, where in (({"classes": {"routes": {"/v1": "gold"}}}, "classes.routes"),
                       ({"classes": {"default": "gold"}}, "classes.default"),
                       ({"overload": {"box_actions": {"reboot": 0.5}}}, "overload.box_actions"),
                       ({"overload": {"box_actions": {"shed": 1.5}}}, "overload.box_actions"),
                       ({"server": {"nice": {"inference": -5}}}, "server.nice"),
                       ({"server": {"nice": {"gpu": 1}}}, "server.nice"),
                       ({"inference": {"queue_deadline": {"critical": 1.0}}}, "inference.queue_deadline"),
                       ({"inference": {"models": [{"name": "m", "class": "gold"}]}}, "inference.models")):
        try:
            config.validate(raw)
        except config.ConfigError as e:
            assert where in str(e), (raw, str(e))
        else:
            raise AssertionError(f"{raw} was accepted")


def test_box_actions_grade_by_share_with_hysteresis():
    w = BoxWatch({"memory_limit": 1000, "box_actions": {"keepalive": 0.8, "shed": 0.9, "accept": 0.95}})
    assert not w.update(500, 0.1) and w.active == set()
    assert w.update(850, 0.1) and w.active == {"keepalive"}
    assert w.update(100, 0.92) and w.active == {"keepalive", "shed"}          # fds count as much as memory
    assert w.update(960, 0.0) and w.active == {"keepalive", "shed", "accept"}
    assert not w.update(935, 0.0)  # 0.935: within 0.02 below accept's 0.95, it stays on
    assert w.update(925, 0.0) and w.active == {"keepalive", "shed"}
    assert w.update(0, 0.0) and w.active == set()
    assert w.describe()["actions"] == [] and w.describe()["memory_limit"] == 1000
    w.configure({"memory_limit": 0, "box_actions": {"shed": 0.5}})
    assert w.limit > 0 and w.thresholds == {"shed": 0.5}  # 0 = the machine's memory


def test_trim_follows_memory_alone():
    w = BoxWatch({"memory_limit": 1000, "box_actions": {"trim": 0.85, "accept": 0.95}})
    assert w.update(100, 0.99) and w.active == {"accept"}  # out of descriptors: dropping caches frees none
    assert w.update(900, 0.10) and w.active == {"trim"}
    assert not w.update(840, 0.10) and w.active == {"trim"}  # (hysteresis)
    assert w.update(800, 0.10) and w.active == set()


def test_trim_drops_the_exact_entries_once_as_it_comes_on():
    from types import SimpleNamespace
    from tidegate.core.cache.exact import ExactStore
    from tidegate.workers.ingress.worker import IngressWorker
    store = ExactStore(1 << 20, 60.0)
    store.put(["k", "t", {"text": "x"}])
    forgot = []
    w = IngressWorker.__new__(IngressWorker)
    w.box, w.http = set(), SimpleNamespace(no_keepalive=False)
    w.accept = SimpleNamespace(box=lambda hold: None)
    w.services = SimpleNamespace(exact=SimpleNamespace(store=store), shedder=SimpleNamespace(box=False),
                                 ratelimit=SimpleNamespace(forget_plans=lambda: forgot.append(1)))
    w._box_actions({"trim"})
    assert store.get("k") is None and forgot == [1]
    store.put(["k", "t", {"text": "x"}])
    w._box_actions({"trim", "keepalive"})  # still on: nothing dropped again
    assert store.get("k") is not None and forgot == [1] and w.http.no_keepalive
