"""A model served by remote OpenAI-compatible servers (vLLM, SGLang, llama-server, llama-cpp-
python's server, another tidegate): `inference.models = [{name, backends = [{url, …}]}]`.

`RemoteModel` has the inference worker client's interface (submit / cancel / send / close, the
same DELTA, END and ERR events), so the OpenAI routes, caches, classes, breakers and shedding in
front of a model do not change. Behind it:

- Routing prefers the backend that already holds the prompt's prefix: the prompt is named by the
  prefix cache's chained block hashes (core/llm/prefix_cache.block_names, over its UTF-8 bytes,
  salted by tenant), each backend remembers the names it was sent (LRU), and the backend with
  the longest run of leading names wins unless it is `balance_slack` requests busier than the
  least loaded one (SGLang's cache-aware router does the same over a radix tree). `routing =
  "round_robin"` or `"least_loaded"` turn affinity off (the benchmark's baseline).
- Health checks (`health_path` every `health_interval`), one circuit breaker per backend, and
  per-backend capacity with the classes' reserved slots (`inference.reserved`): a lower class
  cannot take the last slots.
- Failover (core/llm/failover.py decides; `_generate_one` runs the attempts): deadlines per
  attempt (connect, response headers, first token, the gap between chunks) inside the request's
  own; refusals (429, 503) and failures (5xx, a cut or stalled stream) go to the next backend at
  once, or back to the same one after a full-jitter backoff or its Retry-After; at most
  `retry.attempts` attempts and the model's retry budget; a lost attempt (the body went out,
  then nothing) only where `retry.retry_lost` or the client's Idempotency-Key allow it.
- Streaming-correct: the backend is always asked to stream. Before any delta reached the client
  a failure is invisible to it; after, the next attempt continues the answer from what the
  client has (a trailing assistant message: `prefill`), or the client gets an error event; a
  stream that ends without its finish_reason (a killed backend, a cut connection) is never a
  clean end. A chunk that is not JSON is skipped and counted. The answer names the backend's
  model (VIA, END) and bills only the attempts that answered.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict

import orjson

from tidegate.core.base.breaker import Breaker
from tidegate.core.base.config import CLASSES
from tidegate.core.llm.prefix_cache import block_names
from tidegate.core.base.config import RETRY_DEFAULTS
from tidegate.core.llm.backend_http import Cut, Lost, Pool, Unsent
from tidegate.core.llm.failover import (ANSWER, CLIENT, CONTEXT, ENDED, FILTERED, LOST, OK, REFUSED, SAME, UNSENT,
                                        Outcome, Policy, RetryBudget, classify_status, decide, retry_after_seconds)
from tidegate.core.messaging.protocol import DELTA, EMB, EMBED, END, ERR, GENERATE, VIA, Failure, delta, failure

# what a remote request can carry, by our param name -> the wire name (defaults are left out)
PASSED = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
EXTENSIONS = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}  # llama.cpp's, vLLM's: sent only when set
NOT_FORWARDED = ("logprobs", "n", "logit_bias", "grammar")  # a 400 naming them (never ignored)
PREFIX_BYTES = 64 * 1024  # routing looks at this much of the prompt at most


class Backend:
    __slots__ = ("url", "model", "weight", "api_key", "max_inflight", "inflight", "healthy", "breaker", "seen",
                 "stats", "name", "capacity", "headers", "prefill", "prefill_ok", "lat_ms", "pool")

    def __init__(self, spec: dict, model: str, bc: dict, remember: int):
        self.url = spec["url"].rstrip("/")
        self.name = self.url
        self.model = spec.get("model") or model
        self.weight = float(spec.get("weight", 1.0))
        self.api_key = spec.get("api_key", "")
        self.headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # continues a trailing assistant message (a stream cut mid-answer goes on here): true, false,
        # or "auto": tried, and learnt false at the first 4xx it answers to one
        self.prefill, self.prefill_ok = spec.get("prefill", "auto"), True
        self.lat_ms = 0.0  # answered attempts' latency, a moving average (admin backends)
        self.max_inflight = int(spec.get("max_inflight", 64))
        self.inflight, self.healthy = 0, True
        self.breaker = Breaker.from_config(bc, slow_call=1e9)
        self.seen: OrderedDict[bytes, None] = OrderedDict()  # prefix block names sent here, LRU
        self.stats = {"requests": 0, "connect_errors": 0, "failures": 0, "prefix_blocks_hit": 0, "prefix_blocks": 0,
                      "attempts": 0, "failovers": 0, "malformed_chunks": 0, "served": 0}
        self.capacity = remember  # block names remembered

    @property
    def can_prefill(self) -> bool:
        return self.prefill is True or (self.prefill == "auto" and self.prefill_ok)

    def latency(self, seconds: float) -> None:
        ms = seconds * 1000
        self.lat_ms = ms if not self.lat_ms else 0.8 * self.lat_ms + 0.2 * ms

    def describe(self) -> dict:
        """One row of `tidegate admin backends`."""
        b = self.breaker
        return {"url": self.url, "model": self.model, "healthy": self.healthy, "breaker": b.state,
                "inflight": self.inflight, "latency_ms": round(self.lat_ms, 1),
                "prefill": self.can_prefill, **self.stats}

    def matched(self, names: list[bytes]) -> int:
        n = 0
        for name in names:
            if name not in self.seen:
                break
            n += 1
        return n

    def remember(self, names: list[bytes]) -> None:
        for name in names:
            self.seen[name] = None
            self.seen.move_to_end(name)
        while len(self.seen) > self.capacity:
            self.seen.popitem(last=False)


class BackendChooser:
    """Which backend first, then the others in the order connect errors fall back to."""

    def __init__(self, backends: list[Backend], mode: str, slack: int, reserved: dict):
        self.backends, self.mode, self.slack = backends, mode, slack
        self.reserved = reserved
        self._rr = itertools.count()

    def _room(self, b: Backend, cls: str) -> bool:
        """b has a slot for cls: the slots reserved for the classes above it stay free."""
        above = CLASSES[:CLASSES.index(cls)] if cls in CLASSES else ()
        return b.inflight < b.max_inflight - sum(self.reserved.get(c, 0) for c in above)

    def order(self, names: list[bytes], cls: str) -> list[Backend]:
        ok = [b for b in self.backends if b.healthy and self._room(b, cls) and b.breaker.allow()]
        if not ok:
            return []
        by_load = sorted(ok, key=lambda b: (b.inflight + 1) / b.weight)
        if self.mode == "round_robin":
            i = next(self._rr) % len(ok)
            first = ok[i]
        elif self.mode == "least_loaded" or not names:
            first = by_load[0]
        else:
            best = max(ok, key=lambda b: (b.matched(names), -(b.inflight + 1) / b.weight))
            least = by_load[0]
            if best.matched(names) and best.inflight <= least.inflight + self.slack:
                first = best
            else:  # a prompt new to all: where the least is cached, among those not much busier (the
                # caches fill evenly, so each holds its share of the prompts instead of thrashing)
                near = [b for b in ok if b.inflight <= least.inflight + self.slack]
                first = min(near, key=lambda b: (len(b.seen) / b.weight, (b.inflight + 1) / b.weight))
        return [first] + [b for b in by_load if b is not first]


class RemoteModel:
    def __init__(self, model: dict, cfg: dict, loop, session_factory=None):
        self.name, self.loop = model["name"], loop
        self.cfg = cfg
        self.block = model.get("block", 64)
        self.backends = [Backend(b, model["name"], cfg["breakers"], model.get("remember_blocks", 65536))
                         for b in model["backends"]]
        for b in self.backends:  # generations go through backend_http; health checks and embeddings aiohttp
            b.pool = Pool(b.url, loop, model.get("keepalive", 4.0), model.get("connect_timeout", 2.0))
        self.router = BackendChooser(self.backends, model.get("routing", "prefix"), model.get("balance_slack", 4),
                             cfg["inference"]["reserved"])
        self.connect_timeout = model.get("connect_timeout", 2.0)
        # deadlines per attempt, all inside the request's own (failover.py says what follows each)
        self.header_timeout = model.get("header_timeout", 10.0)
        self.first_token_timeout = model.get("first_token_timeout", 15.0)
        self.stall_timeout = model.get("stall_timeout", 10.0)
        self.request_timeout = cfg["inference"]["request_timeout"]
        retry = model.get("retry") or {}
        retry = {**RETRY_DEFAULTS, **retry}
        self.policy = Policy.of(retry)
        self.budget = RetryBudget(retry["budget_ratio"], retry["budget_min_per_s"])
        self.stats = {"retries": 0, "failovers": 0, "retry_budget_exhausted": 0, "continuations": 0}
        self.health_path, self.health_interval = model.get("health_path", "/v1/models"), model.get("health_interval", 2.0)
        self.keepalive = model.get("keepalive", 4.0)
        self._ids = itertools.count(1)
        self.tasks: dict[int, asyncio.Task] = {}
        self.flows: dict[int, Flow] = {}
        self._session = None
        self._health = loop.create_task(self._check_health())
        self.connected = True

    def session(self):
        if self._session is None:
            import aiohttp  # (the daemon only needs it when a model has remote backends)
            trace = aiohttp.TraceConfig()  # tells _connect whether a request's body went out
            trace.on_request_chunk_sent.append(_body_sent)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                json_serialize=lambda o: orjson.dumps(o).decode(), trace_configs=[trace])
        return self._session

    # ---- the worker client's interface --------------------------------------------------------
    def submit(self, op: str, body, handler) -> int:
        rid = next(self._ids)
        run = self._generate if op == GENERATE else self._embed if op == EMBED else None
        if run is None:
            handler(ERR, failure(400, f"{op!r} is not served by remote models", "unsupported"))
            return rid
        flow = Flow(body.get("window") or 0) if op == GENERATE and body.get("stream", True) else None
        task = self.loop.create_task(run(body, handler) if flow is None else run(body, handler, flow))
        self.tasks[rid] = task
        if flow is not None and flow.window:
            self.flows[rid] = flow
        task.add_done_callback(lambda _t, rid=rid: (self.tasks.pop(rid, None), self.flows.pop(rid, None)))
        return rid

    def send(self, op: str, body) -> None:
        """Nothing a remote model expects without an answer."""

    def credit(self, rid: int, n: int) -> None:
        flow = self.flows.get(rid)
        if flow is not None:
            flow.give(n)

    def cancel(self, rid: int) -> None:
        task = self.tasks.pop(rid, None)
        if task is not None:
            task.cancel()  # closes the backend's response: the backend stops generating

    def close(self) -> None:
        self._health.cancel()
        for b in self.backends:
            b.pool.close()
        for task in list(self.tasks.values()):
            task.cancel()
        if self._session is not None:
            self.loop.create_task(self._session.close())

    def counters(self) -> dict:
        """Its backends' counters, summed (per backend: `tidegate admin backends`), and its own."""
        out = {f"remote_{k}": sum(b.stats[k] for b in self.backends) for k in self.backends[0].stats}
        out.update({f"remote_{k}": v for k, v in self.stats.items()})
        out["remote_retry_budget"] = round(self.budget.balance(), 1)
        return out

    def describe(self) -> dict:
        """Its backends for `tidegate admin backends`, and its retry budget."""
        return {"backends": [b.describe() for b in self.backends], "retry_budget": round(self.budget.balance(), 1),
                **self.stats}

    # ---- one generation -----------------------------------------------------------------------
    def _refused(self, body: dict) -> list | None:
        """A 400 naming what remote backends are not asked to do (never silently dropped)."""
        params = body["params"]
        for p in NOT_FORWARDED:
            if params.get(p, 1) != 1 if p == "n" else p in params:
                name = "response_format" if p == "grammar" else p  # (the grammar comes from response_format)
                return failure(400, f"'{name}' is not supported for model {self.name!r}: it is served by remote "
                               "backends", "unsupported_parameter", name)
        if body.get("tools"):
            return failure(400, f"'tools' are not supported for model {self.name!r}: it is served by remote "
                           "backends", "unsupported_parameter", "tools")
        return None

    def _request(self, body: dict, backend: Backend, st: "Answer | None" = None) -> tuple[str | None, dict]:
        """(path, payload) for backend; a stream under way (st.text) is continued: the chat's
        answer so far as a trailing assistant message (with vLLM's continue_final_message; a
        llama.cpp server continues one as it is), or a completion's prompt followed by it.
        (None, {}) when the answer already has every token it may."""
        params = body["params"]
        out = {"model": backend.model, "stream": True, "stream_options": {"include_usage": True}}
        for ours, wire in PASSED.items():
            if params.get(ours) is not None:
                out[wire] = params[ours]
        for k, default in EXTENSIONS.items():
            if params.get(k, default) != default:
                out[k] = params[k]
        so_far = st.text if st is not None and st.started else ""
        if so_far and out.get("max_tokens"):
            out["max_tokens"] -= st.deltas  # (a delta is a token for the backends we know)
            if out["max_tokens"] <= 0:
                return None, {}
        if "messages" in body:
            out["messages"] = body["messages"]
            if so_far:
                out["messages"] = [*body["messages"], {"role": "assistant", "content": so_far}]
                out["continue_final_message"], out["add_generation_prompt"] = True, False
            return "/v1/chat/completions", out
        out["prompt"] = body["prompt"] + so_far
        return "/v1/completions", out

    def _names(self, body: dict) -> list[bytes]:
        text = orjson.dumps(body["messages"]) if "messages" in body else body["prompt"].encode()
        return block_names(list(text[:PREFIX_BYTES]), self.block, body.get("tenant", ""))

    async def _connect(self, body: dict, path_for, names: list[bytes], cls: str, handler):
        """Embeddings: (backend, response) from the first backend that accepts the connection;
        connect errors move on to the next one (nothing was sent), anything later is the answer."""
        order = self.router.order(names, cls)
        if not order:
            handler(ERR, failure(503, f"no backend of model {self.name!r} is available (down, failing or full)",
                                 "backend_unavailable"))
            return None, None
        last = None
        for b in order:
            path, payload = path_for(body, b)
            b.inflight += 1
            sent = {"body": False}
            try:
                resp = await self.session().post(b.url + path, json=payload, headers=b.headers,
                                                 trace_request_ctx=sent)
            except asyncio.CancelledError:
                b.inflight -= 1
                raise
            except Exception as e:
                b.inflight -= 1
                b.breaker.record(False)
                if sent["body"] or not _transport_error(e):
                    b.stats["failures"] += 1
                    handler(ERR, failure(502, f"model {self.name!r}: backend {b.name} failed the request ({e!r})",
                                         "backend_error"))
                    return None, None
                b.stats["connect_errors"] += 1
                last = e
                continue
            b.stats["requests"] += 1
            return b, resp
        handler(ERR, failure(503, f"no backend of model {self.name!r} accepted the connection ({last!r})",
                             "backend_unavailable"))
        return None, None

    async def _generate(self, body: dict, handler, flow=None) -> None:
        try:
            await self._generate_one(body, handler, flow)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # (every generation ends with an event: a bug here is a 500, not a hang)
            handler(ERR, failure(500, f"model {self.name!r}: remote generation failed ({e!r})", "internal"))

    async def _generate_one(self, body: dict, handler, flow) -> None:
        """Attempts until one answers or the policy says the last failure is the answer (see
        core/llm/failover.py): the same backend after a backoff, the next backend at once, or,
        for a stream under way, a backend that continues it from what the client already has."""
        if (refused := self._refused(body)) is not None:
            handler(ERR, refused)
            return
        loop = asyncio.get_running_loop()
        names, cls = self._names(body), body.get("cls", "standard")
        deadline = loop.time() + min(body.get("timeout") or self.request_timeout, self.request_timeout)
        st = Answer(body.get("stream", True), "messages" in body, _prompt_estimate(body))
        self.budget.deposit()
        attempt, last, tried, again = 0, None, [], None
        while True:
            b = again or self._pick(names, cls, st, tried)
            if b is None:
                handler(ERR, self._exhausted(last, st))
                return
            if attempt:
                self.stats["retries"] += 1
                if b is not tried[-1]:
                    self.stats["failovers"] += 1
                    tried[-1].stats["failovers"] += 1
            tried.append(b)
            o = await self._attempt(b, body, names, st, deadline, handler, flow)
            if o.kind == OK:
                return
            last, again = o, None
            others = self._pick(names, cls, st, tried) is not None
            act = decide(o, attempt, self.policy, others=others, time_left=deadline - loop.time(),
                         idempotent=bool(body.get("idempotent")), can_continue=self._can_continue(st))
            if act.what == ANSWER:
                handler(ERR, self._final(o, st))
                return
            if not self.budget.withdraw():
                self.stats["retry_budget_exhausted"] += 1
                handler(ERR, self._final(o, st))
                return
            attempt += 1
            if act.what == SAME:
                if act.wait:
                    await asyncio.sleep(act.wait)
                again = b if b.breaker.allow() and b.healthy else None  # (else whoever is left, or none)
                if again is None and self._pick(names, cls, st, tried) is None:
                    handler(ERR, self._final(o, st))
                    return

    def _pick(self, names, cls: str, st, tried: list):
        """The backend for the next attempt: the first in the router's order not tried yet (and
        able to continue a stream under way), None when none is left."""
        order = self.router.order(names, cls)
        return next((b for b in order if b not in tried and (not st.started or b.can_prefill)), None)

    def _can_continue(self, st) -> bool:
        return not st.started or any(b.can_prefill for b in self.backends if b.healthy)

    def _final(self, o: Outcome, st) -> list:
        f = Failure.of(o.failure)
        if st.started and o.kind not in (CLIENT, FILTERED):  # mid-stream: the client must not take it as whole
            return failure(502, f"model {self.name!r}: the answer was cut off after {st.deltas} deltas and no "
                           f"backend could continue it ({f.message})", "backend_stream_cut")
        if o.kind == REFUSED and f.status == 429:
            return failure(429, f.message, "backend_rate_limited", f.param, o.retry_after)
        return f.wire() if not o.retry_after else Failure(*f[:4], retry_after=o.retry_after).wire()

    def _exhausted(self, last, st) -> list:
        if last is not None:
            return self._final(last, st)
        return failure(503, f"no backend of model {self.name!r} is available (down, failing or full)",
                       "backend_unavailable")

    async def _attempt(self, b: Backend, body: dict, names, st: "Answer", deadline: float, handler, flow) -> Outcome:
        """One request to b, relayed to the client as it comes; an Outcome says how it ended."""
        loop = asyncio.get_running_loop()
        path, payload = self._request(body, b, st)
        if path is None:  # the stream had all the tokens it may have: it ends here
            st.finish(handler, "length", b, loop.time())
            return Outcome(OK)
        b.inflight += 1
        b.stats["attempts"] += 1
        self.stats["continuations"] += st.started
        t0 = loop.time()
        resp = None
        try:
            try:  # (asyncio.timeout: wait_for made a task per call)
                async with asyncio.timeout(max(0.001, min(self.header_timeout, deadline - t0))):
                    resp = await b.pool.post(path, orjson.dumps(payload), b.headers)
            except Unsent as e:
                b.breaker.record(False)
                b.stats["connect_errors"] += 1
                return Outcome(UNSENT, failure(503, f"model {self.name!r}: backend {b.name} did not take the "
                                               f"connection ({e})", "backend_unavailable"), started=st.started)
            except asyncio.TimeoutError:
                b.breaker.record(False)
                b.stats["failures"] += 1
                return Outcome(LOST, failure(504, f"model {self.name!r}: backend {b.name} sent no answer within "
                                             f"{self.header_timeout:g} s", "backend_timeout"), started=st.started)
            except Lost as e:
                b.breaker.record(False)
                b.stats["failures"] += 1
                return Outcome(LOST, failure(502, f"model {self.name!r}: backend {b.name} dropped the request ({e})",
                                             "backend_error"), started=st.started)
            b.stats["requests"] += 1
            matched = b.matched(names)
            b.stats["prefix_blocks"] += len(names)
            b.stats["prefix_blocks_hit"] += matched
            b.remember(names)
            if resp.status != 200:
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        data = await resp.read()
                except (Cut, asyncio.TimeoutError):
                    data = b""
                fail, code, wait = _error_of(resp.status, resp.headers, data, self.name)
                kind = classify_status(resp.status, code)
                if st.started and kind == CLIENT and b.prefill == "auto":
                    b.prefill_ok = False  # it refuses an assistant prefix: learnt, not asked again
                    kind = ENDED
                b.breaker.record(kind in (CLIENT, FILTERED, CONTEXT))
                b.stats["failures"] += kind not in (CLIENT, FILTERED, CONTEXT)
                return Outcome(kind, fail, wait, st.started)
            o = await self._relay(resp, b, st, handler, flow, deadline)
            if o.kind == OK:
                b.breaker.record(True, loop.time() - t0)
                b.latency(loop.time() - t0)
            else:
                b.breaker.record(False)
                b.stats["failures"] += 1
            return o
        finally:
            b.inflight -= 1
            if resp is not None:
                resp.release()  # (back to the pool when read to its end; else closed: the backend stops)

    async def _relay(self, resp, b: Backend, st: "Answer", handler, flow, deadline: float) -> Outcome:
        """Backend SSE -> DELTA events, then END (not streamed: the whole text in END, as the
        inference worker sends it). The first token must come within first_token_timeout of the
        headers and each next chunk within stall_timeout; a chunk that is not JSON is skipped and
        counted; a stream ends with its finish_reason, then [DONE] or EOF. A stream a window
        ahead of its reader stops reading the backend's answer until credit comes back (TCP
        pushes back on the backend)."""
        loop = asyncio.get_running_loop()
        first_by = loop.time() + self.first_token_timeout
        got = {"tokens": 0, "finish": None, "usage": None}
        buf = b""
        st.begin(b)
        while True:
            now = loop.time()
            wait = min((first_by - now) if not got["tokens"] else self.stall_timeout, deadline - now)
            cut = None
            try:
                async with asyncio.timeout(max(0.001, wait)):
                    chunk = await resp.chunk()  # (what arrived before a cut comes first)
            except asyncio.TimeoutError:
                what = "its first token" if not got["tokens"] else "its next chunk"
                limit = self.first_token_timeout if not got["tokens"] else self.stall_timeout
                return Outcome(ENDED, failure(504, f"model {self.name!r}: backend {b.name} did not send {what} "
                                              f"within {limit:g} s", "backend_timeout"), started=st.started)
            except Cut as e:
                chunk, cut = b"", e
            if chunk:
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    ended = await self._line(line.strip(), b, st, got, handler, flow)
                    if ended is not None:
                        return ended
            if cut is not None:
                return Outcome(ENDED, failure(502, f"model {self.name!r}: the answer was cut off by backend "
                                              f"{b.name} ({cut})", "backend_stream_cut"), started=st.started)
            if not chunk:
                break
        if got["finish"] is None:
            return self._cut(b, st)
        st.finish(handler, got["finish"], b, loop.time(), got["usage"])  # (EOF after the finish, no [DONE]: whole)
        return Outcome(OK)

    async def _line(self, line: bytes, b: Backend, st, got: dict, handler, flow) -> Outcome | None:
        """One SSE line of the backend's answer; an Outcome when it ends the attempt."""
        if not line.startswith(b"data:"):
            return None
        data = line[5:].strip()
        if data == b"[DONE]":
            if got["finish"] is None:
                return self._cut(b, st)
            st.finish(handler, got["finish"], b, asyncio.get_running_loop().time(), got["usage"])
            return Outcome(OK)
        try:
            event = orjson.loads(data)
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError:
            b.stats["malformed_chunks"] += 1  # skipped: one bad chunk does not end a healthy stream
            return None
        if "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            return Outcome(ENDED, failure(502, f"model {self.name!r}: backend {b.name} failed mid-answer "
                                          f"({str(err.get('message'))[:300]})", "backend_error"), started=st.started)
        if event.get("usage"):
            got["usage"] = event["usage"]
        for c in event.get("choices") or ():
            if not isinstance(c, dict):
                continue
            text = (c.get("delta") or {}).get("content") if st.chat else c.get("text")
            if text and isinstance(text, str):
                got["tokens"] += 1
                st.add(handler, text, b, asyncio.get_running_loop().time())
                if flow is not None and st.stream:
                    await flow.sent()
            if c.get("finish_reason"):
                got["finish"] = c["finish_reason"]
        return None

    def _cut(self, b: Backend, st) -> Outcome:
        return Outcome(ENDED, failure(502, f"model {self.name!r}: the answer was cut off by backend {b.name} "
                                      "(the stream closed before its end)", "backend_stream_cut"), started=st.started)

    async def _embed(self, body: dict, handler) -> None:
        def request(body, b):
            return "/v1/embeddings", {"model": b.model, "input": body["input"]}
        b, resp = await self._connect(body, request, [], "standard", handler)
        if b is None:
            return
        try:
            async with resp:
                if resp.status != 200:
                    handler(ERR, _error_of(resp.status, resp.headers, await resp.read(), self.name)[0])
                    return
                res = orjson.loads(await resp.read())
            handler(EMB, {"data": [d["embedding"] for d in sorted(res["data"], key=lambda d: d["index"])],
                          "tokens": int((res.get("usage") or {}).get("prompt_tokens", 0))})
            b.breaker.record(True)
        except Exception as e:
            b.breaker.record(False)
            handler(ERR, failure(502, f"model {self.name!r}: backend {b.name} failed the embedding ({e!r})",
                          "backend_error"))
        finally:
            b.inflight -= 1

    # ---- health -------------------------------------------------------------------------------
    async def _check_health(self) -> None:
        import aiohttp
        while True:
            for b in self.backends:
                try:
                    async with self.session().get(b.url + self.health_path,
                                                  timeout=aiohttp.ClientTimeout(total=self.connect_timeout)) as r:
                        b.healthy = r.status == 200
                except asyncio.CancelledError:
                    raise
                except Exception:
                    b.healthy = False
            await asyncio.sleep(self.health_interval)


class Answer:
    """What of one generation reached the client, across its attempts: a stream's deltas (a
    continuation starts from them), or a whole answer's text of the attempt under way."""
    __slots__ = ("stream", "chat", "prompt", "text", "deltas", "held", "first", "t0", "via", "base")

    def __init__(self, stream: bool, chat: bool, prompt: int):
        self.stream, self.chat, self.prompt = stream, chat, prompt
        self.text, self.deltas = "", 0  # streamed to the client so far
        self.held: list[str] = []       # not streamed: the attempt's text, sent whole in END
        self.first, self.t0 = None, time.monotonic()
        self.via = None                 # the backend the client was told of (VIA)
        self.base = 0                   # deltas streamed before the attempt under way

    @property
    def started(self) -> bool:
        """Part of a stream reached the client: a next attempt must continue it."""
        return self.stream and self.deltas > 0

    def begin(self, b: "Backend") -> None:
        self.held, self.base = [], self.deltas  # (a whole answer restarts; nothing of it went out)

    def _name(self, handler, b: "Backend") -> None:
        if self.via is None:
            self.via = b
            handler(VIA, {"model": b.model, "backend": b.name})

    def add(self, handler, text: str, b: "Backend", now: float) -> None:
        if self.stream:  # (a whole answer names its backend at the end: an attempt may still fail)
            self._name(handler, b)
        if self.first is None:
            self.first = now
        if self.stream:
            self.deltas += 1
            self.text += text
            handler(DELTA, delta(text))
        else:
            self.held.append(text)

    def finish(self, handler, finish: str, b: "Backend", now: float, usage: dict | None = None) -> None:
        """END with the usage of the attempts that answered (a failed one is not billed): the
        backend's own count, else one token a delta and the prompt as estimated; a continuation's
        prompt held the deltas before it, which count as completion."""
        self._name(handler, b)
        b.stats["served"] += 1
        u = usage if isinstance(usage, dict) else {}
        this = (self.deltas - self.base) if self.stream else len(self.held)
        prompt = max(1, _int(u.get("prompt_tokens"), self.prompt + self.base) - self.base)
        completion = _int(u.get("completion_tokens"), this) + self.base
        cached = _int((u.get("prompt_tokens_details") or {}).get("cached_tokens"), 0)
        handler(END, {"text": "".join(self.held), "finish_reason": finish, "model": b.model, "backend": b.name,
                      "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion, "cached_tokens": cached},
                      "ttft_ms": round(((self.first or now) - self.t0) * 1000, 3)})


def _int(v, default: int) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else default


class Flow:
    """A stream's credit: deltas it may send before its reader gives more (window 0: unbounded)."""
    __slots__ = ("window", "count", "limit", "_more")

    def __init__(self, window: int):
        self.window, self.count, self.limit, self._more = window, 0, window, None

    async def sent(self) -> None:
        self.count += 1
        if self.window and self.count >= self.limit:
            self._more = asyncio.get_running_loop().create_future()
            await self._more

    def give(self, n: int) -> None:
        self.limit += n
        if self._more is not None and self.count < self.limit and not self._more.done():
            self._more.set_result(None)


async def _body_sent(session, ctx, params) -> None:
    ctx.trace_request_ctx["body"] = True


def _transport_error(e: Exception) -> bool:
    """A failure of the connection (refused, timed out, reset), not of our own code. Retried on
    the next backend only while the request's body had not been handed to the connection: once
    it was, the backend may have it and be generating (a reset after it read the request had
    been retried: generated twice), so the failure is the client's answer. A pooled connection
    the backend closed is kept from reuse by keepalive_timeout below the backends' own."""
    import aiohttp
    return isinstance(e, (aiohttp.ClientError, OSError, asyncio.TimeoutError))


def _prompt_estimate(body: dict) -> int:
    """~3 characters a token, and 4 a message for the chat template's markers (as OpenAI counts)."""
    if "messages" in body:
        return sum(len(m.get("content") or "") // 3 + 4 for m in body["messages"])
    return max(1, len(body.get("prompt") or "") // 3)


def _error_of(status: int, headers, data: bytes, model: str) -> tuple[list, str | None, float]:
    """A backend's error answer: (the ERR payload, its code, its Retry-After in seconds). Its
    4xx as they are (the client's mistake), its 5xx as 502 (ours to report: the backend failed),
    a 503 as 503 (down or full: the client may come back)."""
    try:
        err = orjson.loads(data).get("error") or {}
    except Exception:
        err = {}
    if isinstance(err, str):
        err = {"message": err}
    wait = retry_after_seconds(headers.get("retry-after") or headers.get("Retry-After"))
    message = str(err.get("message") or f"backend answered {status}")[:1000]
    code = err.get("code") if isinstance(err.get("code"), str) else None
    if status < 500:
        return failure(status, message, code or "backend_rejected", err.get("param")), code, wait
    if status == 503:
        return failure(503, f"model {model!r}: a backend is unavailable ({message})", "backend_unavailable"), code, wait
    return failure(502, f"model {model!r}: a backend failed ({status}: {message})", "backend_error"), code, wait
