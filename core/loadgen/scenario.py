"""A load-test scenario (TOML), checked up front; a problem names the key.

    url = "http://127.0.0.1:8080"
    duration = 150                      # seconds
    timeout = 30.0                      # a request still unanswered after this counts as timed out
    connections = 4000                  # most connections open at once (requests beyond wait: counted)
    profile = [[0, 1.0], [40, 1.0], [70, 3.0], [110, 3.0], [115, 1.0]]   # rate multiplier, linear between points
    phases = {before = [10, 40], spike = [75, 110], after = [120, 150]}  # windows the report compares

    [[streams]]
    name = "fraud"                      # a label in the report
    class = "critical"                  # the class the report groups it under (its key decides the server's)
    rate = 20.0                         # arrivals per second at multiplier 1 (constant arrival rate)
    follows_profile = false             # true: the rate is multiplied by the profile
    method = "POST"
    path = "/v1/predict/fraud"
    headers = {Authorization = "Bearer sk-...", Content-Type = "application/json"}
    body = ['{"entities": {"user": "u${user}"}}']   # templates, one picked at random per request
    vars = {user = [0, 9999]}           # ${name}: a random integer in [lo, hi]
    sessions = 0                        # > 0: open this many sessions with the headers' API key first
                                        # (POST /v1/sessions) and send each request with one of their tokens
"""
from __future__ import annotations

import random
import string
import tomllib

from tidegate.core.base.config import CLASSES


class ScenarioError(ValueError):
    pass


def _num(d: dict, key: str, where: str, default=None, lo: float = 0.0):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
        raise ScenarioError(f"{where}{key}: must be a number >= {lo}")
    return float(v)


class Stream:
    def __init__(self, d: dict, i: int):
        w = f"streams[{i}]."
        unknown = set(d) - {"name", "class", "rate", "follows_profile", "method", "path", "headers", "body", "vars",
                            "sessions"}
        if unknown:
            raise ScenarioError(f"{w}{sorted(unknown)[0]}: unknown key")
        self.name = d.get("name") or f"stream{i}"
        self.cls = d.get("class", "standard")
        if self.cls not in CLASSES:
            raise ScenarioError(f"{w}class: must be one of {', '.join(CLASSES)}")
        self.rate = _num(d, "rate", w, lo=0.0)
        self.follows = bool(d.get("follows_profile", True))
        self.method, self.path = d.get("method", "GET"), d.get("path", "/")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ScenarioError(f"{w}path: must start with /")
        self.headers = {str(k): str(v) for k, v in (d.get("headers") or {}).items()}
        bodies = d.get("body", [])
        self.bodies = [string.Template(b) for b in ([bodies] if isinstance(bodies, str) else bodies)]
        self.vars = {}
        for k, v in (d.get("vars") or {}).items():
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) and v[0] <= v[1]):
                raise ScenarioError(f"{w}vars.{k}: must be [lo, hi] integers")
            self.vars[k] = v
        self.sessions = int(_num(d, "sessions", w, 0))
        for b in self.bodies:  # every ${name} must be a declared var
            try:
                b.substitute({k: 0 for k in self.vars})
            except (KeyError, ValueError) as e:
                raise ScenarioError(f"{w}body: template needs var {e}") from None

    def body(self, rng: random.Random) -> bytes:
        if not self.bodies:
            return b""
        t = rng.choice(self.bodies)
        return t.substitute({k: rng.randint(lo, hi) for k, (lo, hi) in self.vars.items()}).encode()


class Scenario:
    def __init__(self, raw: dict):
        unknown = set(raw) - {"url", "duration", "timeout", "connections", "profile", "phases", "streams"}
        if unknown:
            raise ScenarioError(f"{sorted(unknown)[0]}: unknown key")
        self.url = raw.get("url", "http://127.0.0.1:8080")
        if not self.url.startswith("http://"):
            raise ScenarioError("url: must be http://HOST:PORT")
        hostport = self.url[7:].split("/", 1)[0]
        self.host, _, port = hostport.rpartition(":")
        self.port = int(port) if port.isdigit() else 80
        self.host = self.host or hostport
        self.duration = _num(raw, "duration", "", 60, 1)
        self.timeout = _num(raw, "timeout", "", 30, 0.001)
        self.connections = int(_num(raw, "connections", "", 4000, 1))
        self.profile = raw.get("profile", [[0, 1.0]])
        if not (isinstance(self.profile, list) and self.profile and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p)
                for p in self.profile)) or [p[0] for p in self.profile] != sorted(p[0] for p in self.profile):
            raise ScenarioError("profile: must be [[t, multiplier], ...] with t increasing")
        self.phases = {}
        for name, span in (raw.get("phases") or {}).items():
            if not (isinstance(span, list) and len(span) == 2 and span[0] < span[1]):
                raise ScenarioError(f"phases.{name}: must be [start, end] seconds")
            self.phases[name] = (float(span[0]), float(span[1]))
        streams = raw.get("streams") or []
        if not streams:
            raise ScenarioError("streams: at least one [[streams]] table is needed")
        self.streams = [Stream(s, i) for i, s in enumerate(streams)]

    def multiplier(self, t: float) -> float:
        p = self.profile
        if t <= p[0][0]:
            return float(p[0][1])
        for (t0, m0), (t1, m1) in zip(p, p[1:]):
            if t <= t1:
                return m0 + (m1 - m0) * (t - t0) / (t1 - t0) if t1 > t0 else float(m1)
        return float(p[-1][1])


def load(path: str, overrides: dict | None = None) -> Scenario:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{path}: {e}") from None
    raw.update(overrides or {})
    return Scenario(raw)
