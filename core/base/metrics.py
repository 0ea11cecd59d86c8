"""Request metrics: cheap counters in each worker, summed by the supervisor, rendered once.

A worker only bumps integers in dicts on the request path. It ships a snapshot with every
heartbeat (and a fresh one with each /metrics request); the supervisor keeps the latest snapshot
per live worker and folds the counters of exited workers into a retired total, so counters never
go backwards when a worker is respawned. Rendering uses prometheus_client's exposition code.
"""
from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNTERS = ("bytes_in", "bytes_out", "connections_accepted")
# named counters and gauges that other parts of a worker report (help texts for /metrics)
# why the semantic cache's verifier did not serve a neighbour above the threshold (its reasons;
# "contested": another cached text lies within the contest window, and serving either would be a guess)
SEMANTIC_VETOES = ("numbers", "negation", "entities", "too_long", "overlap", "antonym", "substitution", "order",
                   "model", "contested", "tightened")
# (model: the learned decision said no; contested: another servable neighbour with another answer
# lay within the margin; tightened: a verified outcome refused this entry at this distance)
EXTRA_HELP = {
    "connections_evicted": ("counter", "Idle or slow connections closed to make room while at max_connections"),
    "ratelimit_admitted": ("counter", "Requests admitted by the rate limiter"),
    "remote_requests": ("counter", "Requests sent to remote model backends"),
    "remote_connect_errors": ("counter", "Remote backends that refused or timed out the connection (the next one was tried)"),
    "remote_failures": ("counter", "Attempts at remote backends that failed (an error status, a cut or stalled stream, a timeout)"),
    "remote_attempts": ("counter", "Attempts at remote backends (a request's first and its retries)"),
    "remote_retries": ("counter", "Attempts after a request's first (the same backend or another)"),
    "remote_failovers": ("counter", "Retries that moved a request to another backend"),
    "remote_continuations": ("counter", "Attempts that continued a stream cut mid-answer (an assistant-prefix continuation)"),
    "remote_retry_budget_exhausted": ("counter", "Retries refused by a model's retry budget (the failure was the answer)"),
    "remote_retry_budget": ("gauge", "Retries the models' retry budgets allow now"),
    "remote_malformed_chunks": ("counter", "Stream chunks from remote backends that were not JSON (skipped)"),
    "remote_served": ("counter", "Answers remote backends gave whole (per backend: tidegate admin backends)"),
    "model_fallbacks": ("counter", "Requests a model's fallback model took (inference.models[].fallbacks)"),
    "remote_prefix_blocks": ("counter", "Prompt prefix blocks routed to remote backends"),
    "remote_prefix_blocks_hit": ("counter", "Of those, blocks the chosen backend had been sent before (prefix-affinity hits)"),
    "ws_open": ("gauge", "WebSocket sessions open now"),
    "llm_inflight": ("gauge", "Generations submitted by the ingress workers and not yet over"),
    "tenant_breakers_open": ("gauge", "Per-tenant circuit breakers of a model open now (that tenant's own failures)"),
    "ws_opened": ("counter", "WebSocket sessions opened (upgrades)"),
    "ws_refused_cap": ("counter", "WebSocket sessions closed at once: their address held websocket.max_per_address"),
    "ws_closed_dead": ("counter", "WebSocket sessions closed because their peer did not answer a ping"),
    "state_cluster_calls": ("counter", "Calls to the shared state cluster (state.backend = cluster)"),
    "state_cluster_errors": ("counter", "Calls to the state cluster that failed or timed out (answered 503 or failed open)"),
    "ratelimit_limited": ("counter", "Requests refused with 429 by the rate limiter"),
    "ratelimit_leased": ("counter", "Requests admitted from tokens leased by the bucket owner (no hop)"),
    "owner_unavailable": ("counter", "Owner calls that timed out (rate limits or sessions)"),
    "mesh_frames_sent": ("counter", "Frames sent to peer workers over the mesh"),
    "mesh_messages_sent": ("counter", "Messages sent to peer workers (several per frame)"),
    "mesh_expired": ("counter", "Requests an owner skipped because their deadline had passed"),
    "llm_requests": ("counter", "Generation requests finished by the inference worker(s)"),
    "llm_prompt_tokens": ("counter", "Prompt tokens of finished generations"),
    "llm_cached_tokens": ("counter", "Prompt tokens served from the prefix cache instead of computed"),
    "llm_completion_tokens": ("counter", "Tokens generated"),
    "llm_expired": ("counter", "Requests dropped because their deadline passed while queued"),
    "llm_cancelled": ("counter", "Sequences cancelled because the client went away"),
    "llm_stream_pauses": ("counter", "Times a stream ran a whole window ahead of its reader and paused its generation"),
    "llm_paused_evictions": ("counter", "Paused streams that gave their slot to waiting work (their KV kept in RAM until the reader catches up)"),
    "llm_paused_state_bytes": ("gauge", "RAM holding the KV of paused streams out of their slots"),
    "prefix_hits_live": ("counter", "Prefix-cache hits copied from live KV (tier 1)"),
    "prefix_hits_ram": ("counter", "Prefix-cache hits restored from RAM (tier 2)"),
    "prefix_hits_disk": ("counter", "Prefix-cache hits restored from disk (tier 3)"),
    "prefix_misses": ("counter", "Prompts with no cached prefix"),
    "exact_hits": ("counter", "Exact-cache lookups answered from the cache"),
    "exact_misses": ("counter", "Exact-cache lookups that found nothing (or an expired entry)"),
    "exact_inserts": ("counter", "Answers stored in the exact cache"),
    "exact_evictions": ("counter", "Exact-cache entries evicted for space"),
    "semantic_lookups": ("counter", "Semantic-cache lookups"),
    "semantic_hits": ("counter", "Semantic-cache hits (nearest neighbour passed threshold and verifier)"),
    "semantic_verifier_rejections": ("counter", "Neighbours above the threshold that the verifier rejected"),
    **{f"semantic_veto_{r}": ("counter", f"Semantic neighbours not served, reason: {r}") for r in SEMANTIC_VETOES},
    "semantic_inserts": ("counter", "Answers stored in the semantic cache"),
    "semantic_promoted_hits": ("counter", "Semantic hits served because a verified rephrasing of the entry was as close (promotion)"),
    "semantic_verifications": ("counter", "Verified outcomes: a near-miss's or an audited hit's answer compared with the cached one"),
    "semantic_verified_same": ("counter", "Verifications whose answers agreed (the entry learns it may serve that close)"),
    "semantic_verified_different": ("counter", "Verifications whose answers differed (the entry is tightened)"),
    "semantic_verify_dropped": ("counter", "Verifications dropped because the embedder's queue was full"),
    "semantic_verify_queued": ("gauge", "Verifications waiting in the embedder process"),
    "semantic_audits": ("counter", "Served semantic hits audited: the model asked again in the background class"),
    "semantic_audit_wrong": ("counter", "Audited semantic hits whose answer differed from the model's (wrong hits)"),
    "semantic_audits_started": ("counter", "Background audits of semantic hits started by ingress workers"),
    "semantic_audits_skipped": ("counter", "Audits not started: the background class was shed or the audit cap was reached"),
    "semantic_strict_namespaces": ("gauge", "Namespaces whose measured wrong-hit rate made their decision stricter"),
    "semantic_evictions": ("counter", "Semantic entries evicted because a namespace was full"),
    "semantic_namespaces_evicted": ("counter", "Semantic namespaces dropped at the namespace caps (LRU)"),
    "semantic_expired": ("counter", "Semantic entries dropped at their TTL"),
    "semantic_index_rebuilds": ("counter", "Semantic indexes rebuilt from the payload store at start"),
    "semantic_timeouts": ("counter", "Semantic lookups that took longer than semantic_timeout (a miss)"),
    "semantic_skipped": ("counter", "Semantic lookups skipped (a miss at once) while the embedder's circuit breaker was open"),
    "semantic_inserts_skipped": ("counter", "Answers not sent to the semantic cache while the embedder's circuit breaker was not closed (it was behind)"),
    "embed_batches": ("counter", "Embedding batches (one per embedder loop turn with work)"),
    "embed_texts": ("counter", "Texts embedded (embed_texts / embed_batches = mean batch size)"),
    "embed_seconds": ("counter", "Seconds spent embedding"),
    "embed_reused": ("counter", "Texts whose vector was reused from a recent lookup (an insert after its miss) instead of embedded again"),
    "predict_requests": ("counter", "Predictions answered (instances of /v1/predict, batch forms included)"),
    "predict_batches": ("counter", "Micro-batches scored (predict_requests / predict_batches = mean batch size)"),
    "predict_defaulted": ("counter", "Model inputs that took their default (missing, expired, late or down)"),
    "redis_reads": ("counter", "Feature rows read from Redis within their deadline"),
    "redis_late": ("counter", "Redis reads (one per micro-batch) that missed their class's deadline"),
    "redis_errors": ("counter", "Redis reads that failed"),
    "redis_breaker_opened": ("counter", "Times a worker's Redis circuit breaker opened"),
    "model_batches": ("counter", "Batches scored by the model worker (one per model per loop turn)"),
    "model_expired": ("counter", "Micro-batches the model worker dropped unscored: they waited past predict.worker_timeout"),
    "model_queue_full": ("counter", "Micro-batches the model worker refused: their class's queue was full"),
    "model_queued": ("gauge", "Micro-batches waiting at the model worker now"),
    "model_rows": ("counter", "Rows scored by the model worker"),
    "model_seconds": ("counter", "Seconds the model worker spent scoring"),
    "semantic_approximate": ("counter", "Nearest semantic entries handed out unverified as approximate answers to shed requests"),
    "shed_critical_stale": ("counter", "Critical requests shed and answered from a stale cache entry"),
    "shed_critical_approximate": ("counter", "Critical requests shed and answered with the nearest semantic entry"),
    "shed_critical_fallback": ("counter", "Critical requests shed and answered with the last prediction or a static fallback"),
    "shed_critical_rejected": ("counter", "Critical requests shed with 503 + Retry-After"),
    "shed_standard_stale": ("counter", "Standard requests shed and answered from a stale cache entry"),
    "shed_standard_approximate": ("counter", "Standard requests shed and answered with the nearest semantic entry"),
    "shed_standard_fallback": ("counter", "Standard requests shed and answered with the last prediction or a static fallback"),
    "shed_standard_rejected": ("counter", "Standard requests shed with 503 + Retry-After"),
    "shed_background_stale": ("counter", "Background requests shed and answered from a stale cache entry"),
    "shed_background_approximate": ("counter", "Background requests shed and answered with the nearest semantic entry"),
    "shed_background_fallback": ("counter", "Background requests shed and answered with the last prediction or a static fallback"),
    "shed_background_rejected": ("counter", "Background requests shed with 503 + Retry-After"),
    "breakers_opened": ("counter", "Times a circuit breaker opened (every downstream; see tidegate admin breakers)"),
    "breakers_open": ("gauge", "Circuit breakers not closed now (open or half-open), all workers"),
    "semantic_entries": ("gauge", "Entries in the semantic cache"),
    "exact_bytes": ("gauge", "Bytes held by the exact cache, all owners"),
    "events_appended": ("counter", "Events appended to the log by their partition owners"),
    "log_blocks": ("counter", "Event-log blocks written (one write + fsync each)"),
    "log_bytes": ("counter", "Event-log bytes written"),
    "log_write_errors": ("counter", "Event-log writes that failed (the partition stops acknowledging)"),
    "views_events_applied": ("counter", "Events applied to the views by the view builder"),
    "views_quarantined": ("counter", "Events the view builder could not apply (logged with partition and offset, skipped)"),
    "views_full": ("gauge", "1 while the views store is full: the view builder stopped (its log names the largest view)"),
    "view_lag_seconds": ("gauge", "Seconds since the view builder was last caught up with the log"),
    "llm_active_sequences": ("gauge", "Sequences decoding now"),
    "llm_paused_sequences": ("gauge", "Sequences holding a slot, paused until their stream's reader catches up"),
    "llm_queued": ("gauge", "Generation requests waiting for a sequence slot"),
    "prefix_ram_bytes": ("gauge", "KV bytes held by the RAM prefix tier"),
    "prefix_disk_bytes": ("gauge", "KV bytes held by the disk prefix tier"),
    "ratelimit_buckets": ("gauge", "Token buckets held, all workers"),
    "sessions_live": ("gauge", "Sessions held, all workers"),
}


class WorkerMetrics:
    """Owned by one ingress worker's event loop; no locking needed. Answers are counted by
    `tidegate.ext.httpconn.observe` on the hot path (the one writer of requests and latency)."""
    buckets = LATENCY_BUCKETS

    __slots__ = ("requests", "latency", "bytes_in", "bytes_out", "connections_accepted", "open_connections",
                 "extra")

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., +Inf count, sum]
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections_accepted = 0
        self.open_connections = 0
        self.extra: dict[str, float] = {}  # names from EXTRA_HELP, set by the worker before a snapshot

    def snapshot(self) -> dict:
        return {
            "requests": [[r, s, n] for (r, s), n in self.requests.items()],
            "latency": self.latency,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "connections_accepted": self.connections_accepted,
            "open_connections": self.open_connections,
            "extra": self.extra,
        }


def _empty() -> dict:
    return {"requests": {}, "latency": {}, "extra": {}, "breakers_opened": {}, **{c: 0 for c in COUNTERS}}


def _fold(total: dict, snap: dict) -> None:
    for route, status, n in snap.get("requests", ()):
        key = (route, int(status))
        total["requests"][key] = total["requests"].get(key, 0) + n
    for route, h in snap.get("latency", {}).items():
        acc = total["latency"].setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1) + [0.0])
        for i, v in enumerate(h):
            acc[i] += v
    for c in COUNTERS:
        total[c] += snap.get(c, 0)
    for downstream, b in (snap.get("breakers") or {}).items():
        total["breakers_opened"][downstream] = total["breakers_opened"].get(downstream, 0) + b.get("opened", 0)
    for name, v in snap.get("extra", {}).items():
        if EXTRA_HELP.get(name, ("gauge",))[0] == "counter":
            total["extra"][name] = total["extra"].get(name, 0) + v


# what bites when a client, tenant or request reaches a limit (admin status lists those above 0)
LIMIT_METRICS = ("connections_evicted", "ws_refused_cap", "ratelimit_limited", "tenant_breakers_open",
                 "owner_unavailable", "llm_expired", "llm_stream_pauses", "llm_paused_evictions",
                 "llm_paused_state_bytes", "exact_evictions", "semantic_evictions", "semantic_namespaces_evicted",
                 "semantic_timeouts", "model_expired", "model_queue_full", "views_full",
                 "remote_retry_budget_exhausted", "model_fallbacks",
                 *(f"shed_{c}_{how}" for c in ("critical", "standard", "background")
                   for how in ("stale", "approximate", "fallback", "rejected")))


class Aggregator:
    """Owned by the supervisor: latest snapshot per live worker + retired totals."""

    def __init__(self):
        self.live: dict[str, dict] = {}
        self.retired = _empty()

    def update(self, worker: str, snap: dict) -> None:
        self.live[worker] = snap

    def retire(self, worker: str) -> None:
        snap = self.live.pop(worker, None)
        if snap:
            _fold(self.retired, snap)

    def totals(self) -> dict:
        total = copy.deepcopy(self.retired)
        for snap in self.live.values():
            _fold(total, snap)
        total["open_connections"] = sum(s.get("open_connections", 0) for s in self.live.values())
        states: dict = {}  # (downstream, state) -> live workers whose breaker for it is in that state
        for snap in self.live.values():
            for downstream, b in (snap.get("breakers") or {}).items():
                states[(downstream, b["state"])] = states.get((downstream, b["state"]), 0) + 1
        total["breaker_states"] = states
        for snap in self.live.values():  # gauges: live workers only
            for name, v in snap.get("extra", {}).items():
                if EXTRA_HELP.get(name, ("gauge",))[0] == "gauge":
                    total["extra"][name] = total["extra"].get(name, 0) + v
        return total

    def limits(self) -> dict:
        """The protective limits that have bitten (refused, evicted, paused, shed...), by metric
        name, for `tidegate admin status`: only those above zero."""
        got = self.totals()["extra"]
        return {k: got[k] for k in LIMIT_METRICS if got.get(k)}

    def render(self, extra: list[tuple[str, str, str, float]] = ()) -> bytes:
        """Prometheus text format. extra: (kind "gauge"|"counter", name, help, value) from the supervisor."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.totals(), extra))
        return generate_latest(registry)


class _Collector:
    def __init__(self, totals: dict, extra):
        self.t, self.extra = totals, extra

    def collect(self):
        t = self.t
        req = CounterMetricFamily("tidegate_http_requests", "HTTP requests answered, by route and status",
                                  labels=["route", "status"])
        for (route, status), n in sorted(t["requests"].items()):
            req.add_metric([route, str(status)], n)
        yield req
        lat = HistogramMetricFamily("tidegate_http_request_duration_seconds",
                                    "Time from first request byte to response written", labels=["route"])
        for route, h in sorted(t["latency"].items()):
            cum, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), h[:-1]):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            lat.add_metric([route], buckets, sum_value=h[-1])
        yield lat
        yield CounterMetricFamily("tidegate_http_received_bytes", "Bytes read from clients", value=t["bytes_in"])
        yield CounterMetricFamily("tidegate_http_sent_bytes", "Bytes written to clients", value=t["bytes_out"])
        yield CounterMetricFamily("tidegate_connections_accepted", "Client connections accepted",
                                  value=t["connections_accepted"])
        yield GaugeMetricFamily("tidegate_connections_open", "Client connections open now, all workers",
                                value=t["open_connections"])
        state = GaugeMetricFamily("tidegate_breaker_state", "Workers whose circuit breaker for a downstream is in a "
                                  "state now (closed, open, half_open)", labels=["downstream", "state"])
        for (downstream, st), n in sorted(t.get("breaker_states", {}).items()):
            state.add_metric([downstream, st], n)
        yield state
        opened = CounterMetricFamily("tidegate_breaker_transitions_to_open", "Times a downstream's circuit breaker "
                                     "opened, all workers", labels=["downstream"])
        for downstream, n in sorted(t["breakers_opened"].items()):
            opened.add_metric([downstream], n)
        yield opened
        for name, (kind, help_) in EXTRA_HELP.items():
            if name in t["extra"]:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(f"tidegate_{name}", help_, value=t["extra"][name])
        for kind, name, help_, value in self.extra:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_, value=value)
