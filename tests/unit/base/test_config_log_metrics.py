"""Unit tests for the pure logic in core/ and ext/."""
import io
import json

import pytest

from tidegate.core.base import config
from tidegate.core.base.jsonlog import Logger, scrub
from tidegate.core.base.metrics import Aggregator, WorkerMetrics
from tidegate.ext.httpconn import observe
from tidegate.ext import jsonguard


# ---- config -----------------------------------------------------------------------------------
def test_defaults_validate():
    cfg = config.validate({})
    assert cfg["server"]["bind"] == "127.0.0.1:8080"
    assert cfg["limits"]["max_body_bytes"] == 1024 * 1024
    assert config.resolve_workers(cfg) >= 1


@pytest.mark.parametrize("raw, needle", [
    ({"server": {"wokers": 2}}, "server.wokers: unknown key"),
    ({"serve": {}}, "serve: unknown section"),
    ({"server": {"workers": "many"}}, "server.workers"),
    ({"server": {"workers": 0}}, "server.workers"),
    ({"server": {"backlog": "x"}}, "server.backlog: expected int, got str"),
    ({"server": {"backlog": True}}, "server.backlog: expected int, got bool"),
    ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes: must be > 0"),
    ({"server": {"bind": "localhost"}}, "server.bind"),
    ({"server": {"bind": "1.2.3.4:99999"}}, "server.bind"),
    ({"log": {"level": "loud"}}, "log.level"),
    ({"control": {"endpoint": "tcp://127.0.0.1:5555"}}, "control.endpoint: a tcp:// control socket needs"),
    ({"control": {"endpoint": "http://x"}}, "control.endpoint"),
    ({"inference": {"n_gpu_layers": "all"}}, "inference.n_gpu_layers"),
    ({"inference": {"n_gpu_layers": -1}}, "inference.n_gpu_layers"),
    ({"inference": {"models": [{"name": "m", "n_gpu_layers": "max"}]}}, "n_gpu_layers must be \"auto\""),
])
def test_bad_config_names_key(raw, needle):
    with pytest.raises(config.ConfigError) as e:
        config.validate(raw)
    assert needle in str(e.value)


def test_float_key_accepts_int_and_load_reads_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[server]\ngraceful_timeout = 3\nbind = ["127.0.0.1:1", "[::1]:2"]\n')
    cfg = config.load(str(p), {"server.workers": 2})
    assert cfg["server"]["graceful_timeout"] == 3.0 and cfg["server"]["workers"] == 2
    assert config.binds(cfg) == ["127.0.0.1:1", "[::1]:2"]
    assert config.parse_bind("[::1]:2") == ("::1", 2)


def test_load_reports_toml_syntax_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[server\n")
    with pytest.raises(config.ConfigError, match="c.toml"):
        config.load(str(p))
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(str(tmp_path / "missing.toml"))


def test_redacted_masks_secrets():
    cfg = config.validate({})
    cfg["control"]["curve_secret_key"] = "x" * 40
    assert config.redacted(cfg)["control"]["curve_secret_key"] == "***"


# ---- jsonguard --------------------------------------------------------------------------------
def test_jsonguard_depth_and_numbers():
    assert jsonguard.scan(b'{"a": [1, 2, {"b": null}]}', 3, 10) == (jsonguard.OK, -1)
    assert jsonguard.scan(b'{"a": [1, 2, {"b": null}]}', 2, 10)[0] == jsonguard.TOO_DEEP
    assert jsonguard.scan(b"[" * 100000 + b"]" * 100000, 64, 10) == (jsonguard.TOO_DEEP, 64)
    assert jsonguard.scan(b'[12345678901]', 5, 10) == (jsonguard.NUMBER_TOO_LONG, 1)
    assert jsonguard.scan(b'[1.5e-300, -2]', 5, 10)[0] == jsonguard.OK


def test_jsonguard_ignores_string_contents():
    body = json.dumps({"s": "[[[[[[ {{{{ 123456789012345 \" \\ ]]]"}).encode()
    assert jsonguard.scan(body, 1, 3) == (jsonguard.OK, -1)


# ---- logs -------------------------------------------------------------------------------------
def test_logger_masks_secrets():
    out = io.StringIO()
    lg = Logger("t", "debug", out)
    lg.info("login Bearer abcdefghijk", api_key="sk-live-123456789", headers=[("Authorization", "Bearer xyz")],
            note="key sk-abcdefghijklmnop here", user="bob")
    line = out.getvalue()
    rec = json.loads(line)
    for secret in ("abcdefghijk", "sk-live-123456789", "xyz", "sk-abcdefghijklmnop"):
        assert secret not in line
    assert rec["user"] == "bob" and rec["level"] == "info" and rec["process"] == "t"
    assert scrub({"token": 5}) == {"token": "[redacted]"}


def test_logger_threshold():
    out = io.StringIO()
    Logger("t", "warning", out).info("hidden")
    assert out.getvalue() == ""


# ---- metrics ----------------------------------------------------------------------------------
def test_aggregator_sums_workers_and_keeps_retired_counts():
    a, b = WorkerMetrics(), WorkerMetrics()
    for _ in range(3):
        observe(a, "/healthz", 200, 0.0002)
    observe(b, "/healthz", 200, 0.3)
    observe(b, "/v1/echo", 400, 0.001)
    a.open_connections, b.open_connections = 2, 5
    agg = Aggregator()
    agg.update("a", a.snapshot())
    agg.update("b", b.snapshot())
    t = agg.totals()
    assert t["requests"][("/healthz", 200)] == 4 and t["open_connections"] == 7
    agg.retire("b")  # b died: its counters stay, its gauge goes
    t = agg.totals()
    assert t["requests"][("/healthz", 200)] == 4 and t["requests"][("/v1/echo", 400)] == 1
    assert t["open_connections"] == 2
    text = agg.render([("gauge", "tidegate_workers_ready", "ready", 1)]).decode()
    assert 'tidegate_http_requests_total{route="/healthz",status="200"} 4.0' in text
    assert 'tidegate_http_request_duration_seconds_bucket{le="0.0005",route="/healthz"} 3.0' in text
    assert 'tidegate_http_request_duration_seconds_count{route="/healthz"} 4.0' in text
    assert "tidegate_workers_ready 1.0" in text


def test_keys_file_is_merged_and_validated(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('keys = [{key_sha256 = "' + "b" * 64 + '", tenant = "t2"}]\n')
    cfg = config.validate({"auth": {"keys": [{"key_sha256": "a" * 64, "tenant": "t1"}], "keys_file": str(f)}})
    assert [k["tenant"] for k in cfg["auth"]["keys"]] == ["t1", "t2"]
    f.write_text('keys = [{key_sha256 = "nothex", tenant = "t2"}]\n')
    with pytest.raises(config.ConfigError, match="auth.keys_file"):
        config.validate({"auth": {"keys_file": str(f)}})
    with pytest.raises(config.ConfigError, match="auth.keys_file"):
        config.validate({"auth": {"keys_file": str(tmp_path / "missing.toml")}})
    f.write_text('keys = [{key_sha256 = "' + "a" * 64 + '", tenant = "t2"}]\n')
    with pytest.raises(config.ConfigError, match="listed twice"):
        config.validate({"auth": {"keys": [{"key_sha256": "a" * 64, "tenant": "t1"}], "keys_file": str(f)}})


def test_example_config_is_valid_and_lists_every_key():
    import os
    import tomllib
    from tidegate.core.base import config
    from tidegate.workers import load_config
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "conf", "tidegate.toml")
    load_config(path)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    text = open(path).read()  # secrets and lists of tables are shown commented out
    missing = [f"{sec}.{k}" for sec, keys in config.SCHEMA.items() for k in keys
               if k not in raw.get(sec, {}) and f"# {k} =" not in text]
    assert not missing, missing


@pytest.mark.parametrize("raw, needle", [
    ({"inference": {"max_seqs": 600}}, "max_seqs must not exceed n_batch"),
    ({"inference": {"max_seqs": 2, "reserved": {"critical": 2}}}, "inference.reserved"),
    ({"inference": {"models": [{"name": ".."}]}}, "not starting with a dot"),
    ({"inference": {"shared_prefixes": [3]}}, "inference.shared_prefixes"),
])
def test_config_that_would_break_later_is_refused_now(raw, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.validate(raw)


@pytest.mark.parametrize("view, needle", [
    ({"name": "v", "kind": "count", "window": "1h"}, "window must be a number"),
    ({"name": "v", "kind": "last_n", "n": -1}, "n must be an integer"),
    ({"name": "x" * 65, "kind": "count"}, "1 to 64 characters"),
])
def test_view_declarations_are_checked_by_the_events_rule(view, needle):
    from tidegate.workers import CONFIG_RULES
    with pytest.raises(config.ConfigError, match=needle):
        config.validate({"events": {"views": [view]}}, CONFIG_RULES)


def test_gpu_layers_auto_offloads_all_only_where_llama_cpp_can():
    from tidegate.core.llm.engine import ALL_LAYERS, gpu_layers
    assert config.validate({})["inference"]["n_gpu_layers"] == "auto"
    assert config.validate({"inference": {"models": [{"name": "m", "n_gpu_layers": 12}]}})
    assert gpu_layers("auto", True) == ALL_LAYERS and gpu_layers("auto", False) == 0
    assert gpu_layers(12, True) == 12 and gpu_layers(0, True) == 0


def test_every_secret_is_masked_and_a_worker_gets_only_those_its_kind_uses():
    from tidegate.core.base import config
    cfg = config.load(None, {"state.password": "pw", "features.redis_url": "rediss://u:p%40ss@h:6380/0",
                             "inference.models": [{"name": "r", "backends": [{"url": "http://x", "api_key": "sk-1"}]}]})
    shown = config.redacted(cfg)
    assert shown["state"]["password"] == "***" and shown["features"]["redis_url"] == "rediss://u:***@h:6380/0"
    assert shown["inference"]["models"][0]["backends"][0]["api_key"] == "***"
    assert cfg["state"]["password"] == "pw"  # (a copy)
    ingress = config.for_worker(cfg, "ingress")
    assert ingress["state"]["password"] == "pw" and ingress["features"]["redis_url"].endswith("p%40ss@h:6380/0")
    assert ingress["inference"]["models"][0]["backends"][0]["api_key"] == "sk-1"
    other = config.for_worker(cfg, "inference")
    assert other["state"]["password"] == "***" and other["inference"]["models"][0]["backends"][0]["api_key"] == "***"
