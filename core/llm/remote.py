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
- Retries on connect errors only (nothing reached the backend, so nothing can be generated
  twice); once a request was sent, its failure is the client's answer.
- Streaming-correct: the backend is always asked to stream, and a stream that ends without its
  finish_reason and [DONE] (a killed backend, a cut connection) reaches the client as an error
  event, never as a clean end.
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
from tidegate.core.messaging.protocol import DELTA, EMB, EMBED, END, ERR, GENERATE, delta, failure

# what a remote request can carry, by our param name -> the wire name (defaults are left out)
PASSED = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
EXTENSIONS = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}  # llama.cpp's, vLLM's: sent only when set
REFUSED = ("logprobs", "n", "logit_bias", "grammar")  # not forwarded: a 400 naming them (never ignored)
PREFIX_BYTES = 64 * 1024  # routing looks at this much of the prompt at most


class Backend:
    __slots__ = ("url", "model", "weight", "api_key", "max_inflight", "inflight", "healthy", "breaker", "seen",
                 "stats", "name", "capacity")

    def __init__(self, spec: dict, model: str, bc: dict, remember: int):
        self.url = spec["url"].rstrip("/")
        self.name = self.url
        self.model = spec.get("model") or model
        self.weight = float(spec.get("weight", 1.0))
        self.api_key = spec.get("api_key", "")
        self.max_inflight = int(spec.get("max_inflight", 64))
        self.inflight, self.healthy = 0, True
        self.breaker = Breaker.from_config(bc, slow_call=1e9)
        self.seen: OrderedDict[bytes, None] = OrderedDict()  # prefix block names sent here, LRU
        self.stats = {"requests": 0, "connect_errors": 0, "failures": 0, "prefix_blocks_hit": 0, "prefix_blocks": 0}
        self.capacity = remember  # block names remembered

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
        self.router = BackendChooser(self.backends, model.get("routing", "prefix"), model.get("balance_slack", 4),
                             cfg["inference"]["reserved"])
        self.connect_timeout = model.get("connect_timeout", 2.0)
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
        for task in list(self.tasks.values()):
            task.cancel()
        if self._session is not None:
            self.loop.create_task(self._session.close())

    def counters(self) -> dict:
        """Its backends' counters, summed (per backend: `tidegate admin breakers`)."""
        return {f"remote_{k}": sum(b.stats[k] for b in self.backends) for k in self.backends[0].stats}

    # ---- one generation -----------------------------------------------------------------------
    def _request(self, body: dict, backend: Backend) -> tuple[str, dict] | tuple[None, list]:
        params = body["params"]
        for p in REFUSED:
            if params.get(p, 1) != 1 if p == "n" else p in params:
                name = "response_format" if p == "grammar" else p  # (the grammar comes from response_format)
                return None, failure(400, f"'{name}' is not supported for model {self.name!r}: it is served by remote "
                                   "backends", "unsupported_parameter", name)
        if body.get("tools"):
            return None, failure(400, f"'tools' are not supported for model {self.name!r}: it is served by remote backends",
                          "unsupported_parameter", "tools")
        out = {"model": backend.model, "stream": True, "stream_options": {"include_usage": True}}
        for ours, wire in PASSED.items():
            if params.get(ours) is not None:
                out[wire] = params[ours]
        for k, default in EXTENSIONS.items():
            if params.get(k, default) != default:
                out[k] = params[k]
        if "messages" in body:
            out["messages"] = body["messages"]
            return "/v1/chat/completions", out
        out["prompt"] = body["prompt"]
        return "/v1/completions", out

    def _names(self, body: dict) -> list[bytes]:
        text = orjson.dumps(body["messages"]) if "messages" in body else body["prompt"].encode()
        return block_names(list(text[:PREFIX_BYTES]), self.block, body.get("tenant", ""))

    async def _connect(self, body: dict, path_for, names: list[bytes], cls: str, handler):
        """(backend, response) from the first backend that accepts the connection; connect errors
        move on to the next one (nothing was sent), anything later is the answer."""
        order = self.router.order(names, cls)
        if not order:
            handler(ERR, failure(503, f"no backend of model {self.name!r} is available (down, failing or full)",
                          "backend_unavailable"))
            return None, None
        last = None
        for b in order:
            path, payload = path_for(body, b)
            if path is None:
                handler(ERR, payload)
                return None, None
            headers = {"Authorization": f"Bearer {b.api_key}"} if b.api_key else {}
            b.inflight += 1
            sent = {"body": False}  # set by the trace once the body is handed to the connection
            try:
                resp = await self.session().post(b.url + path, json=payload, headers=headers, trace_request_ctx=sent)
            except asyncio.CancelledError:
                b.inflight -= 1
                raise
            except Exception as e:
                b.inflight -= 1
                b.breaker.record(False)
                if sent["body"] or not _transport_error(e):  # it may have arrived: the answer is the client's
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
        names = self._names(body)
        b, resp = await self._connect(body, self._request, names, body.get("cls", "standard"), handler)
        if b is None:
            return
        t0 = time.monotonic()
        matched = b.matched(names)
        b.stats["prefix_blocks"] += len(names)
        b.stats["prefix_blocks_hit"] += matched
        b.remember(names)
        try:
            async with resp:
                if resp.status != 200:
                    b.breaker.record(resp.status < 500)
                    handler(ERR, await _error_of(resp, self.name))
                    return
                ended = await self._relay(resp, "messages" in body, body.get("stream", True), handler, t0, flow,
                                          _prompt_estimate(body))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the connection broke mid-answer
            ended, cause = False, repr(e)
        else:
            cause = "the backend closed the stream before its end"
        finally:
            b.inflight -= 1
        if not ended:
            b.stats["failures"] += 1
            b.breaker.record(False)
            handler(ERR, failure(502, f"model {self.name!r}: the answer was cut off by backend {b.name} ({cause})",
                          "backend_stream_cut"))
        else:
            b.breaker.record(True, time.monotonic() - t0)

    async def _relay(self, resp, chat: bool, stream: bool, handler, t0: float, flow=None, prompt: int = 0) -> bool:
        """Backend SSE -> DELTA events, then END (not streamed: the whole text in END, as the
        inference worker sends it); True only when the stream really ended (its finish_reason
        seen, then [DONE] or EOF). A stream a window ahead of its reader stops reading the
        backend's answer until credit comes back (TCP pushes back on the backend)."""
        finish, usage, first, held, deltas = None, None, None, [], 0
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    if finish is None:
                        return False
                    self._end(handler, finish, usage or _estimate(deltas, prompt), first, t0, "".join(held))
                    return True
                event = orjson.loads(data)
                if "error" in event:
                    return False
                if event.get("usage"):
                    usage = event["usage"]
                for c in event.get("choices") or ():
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if text:
                        deltas += 1
                        if first is None:
                            first = time.monotonic()
                        if stream:
                            handler(DELTA, delta(text))
                            if flow is not None:
                                await flow.sent()
                        else:
                            held.append(text)
                    if c.get("finish_reason"):
                        finish = c["finish_reason"]
        if finish is None:
            return False
        self._end(handler, finish, usage or _estimate(deltas, prompt), first, t0, "".join(held))  # (EOF, no [DONE])
        return True

    @staticmethod
    def _end(handler, finish: str, usage, first, t0: float, text: str) -> None:
        u = usage
        prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
        cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0)
        handler(END, {"text": text, "finish_reason": finish,
                      "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion, "cached_tokens": cached},
                      "ttft_ms": round(((first or time.monotonic()) - t0) * 1000, 3)})

    async def _embed(self, body: dict, handler) -> None:
        def request(body, b):
            return "/v1/embeddings", {"model": b.model, "input": body["input"]}
        b, resp = await self._connect(body, request, [], "standard", handler)
        if b is None:
            return
        try:
            async with resp:
                if resp.status != 200:
                    handler(ERR, await _error_of(resp, self.name))
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


def _estimate(deltas: int, prompt: int) -> dict:
    """Usage of a backend that sends none in its stream (llama-cpp-python's server ignores
    stream_options): llama.cpp-family servers send one token per delta; the prompt is estimated
    as the reservation was (~3 characters a token), so tokens/minute counts it, never 0."""
    return {"prompt_tokens": prompt, "completion_tokens": deltas}


def _prompt_estimate(body: dict) -> int:
    """~3 characters a token, and 4 a message for the chat template's markers (as OpenAI counts)."""
    if "messages" in body:
        return sum(len(m.get("content") or "") // 3 + 4 for m in body["messages"])
    return max(1, len(body.get("prompt") or "") // 3)


async def _error_of(resp, model: str) -> list:
    """A backend's error answer as an ERR event: its 4xx as they are (the client's mistake), its
    5xx as 502 (ours to report: the backend failed)."""
    try:
        err = orjson.loads(await resp.read()).get("error") or {}
    except Exception:
        err = {}
    if isinstance(err, str):
        err = {"message": err}
    message = err.get("message") or f"backend answered {resp.status}"
    if resp.status < 500:
        return failure(resp.status, message, err.get("code") or "backend_rejected", err.get("param"))
    return failure(502, f"model {model!r}: a backend failed ({resp.status}: {message})", "backend_error")
