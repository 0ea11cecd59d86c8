"""Replies of the OpenAI routes: one generation's inference events -> the HTTP answer.

The inference worker sends DELTA events (text), then END (finish reason, usage) or ERR. A
non-streamed request answers one JSON body at END; a streamed one answers SSE `data:` chunks in
OpenAI's shapes, ending with `data: [DONE]`. The first event decides the status, so an error found
by the inference worker (context overflow, full queue) still gets its own status code. A cached
entry is replayed through the same path, so a hit looks exactly like a generation.
"""
from __future__ import annotations

import asyncio
import os
import time

import orjson

from tidegate.core.http.http11 import Stream, json_response
from tidegate.core.llm.tools import parse_calls
from tidegate.core.messaging.protocol import DELTA, END, ERR, VIA, delta, failure, http_error, read_delta


def sse(data, event: str | None = None) -> bytes:
    """One server-sent event: `data: JSON` (or the bytes given, such as [DONE]), after an
    `event:` line when it has a type (the Responses API's events)."""
    body = data if data.__class__ is bytes else orjson.dumps(data)
    return (b"event: " + event.encode() + b"\ndata: " if event else b"data: ") + body + b"\n\n"


DONE = sse(b"[DONE]")


class Generation:
    """One generation in flight: turns inference events into the HTTP answer.

    The route hands it what it needs and nothing more: the request, its stream window, the
    link its sequence runs over (`attach`), and `on_done(entry, used)`, called exactly once when
    the generation is over: `entry` is the answer to cache (an END that stopped or ran to length,
    when keep_text), `used` the tokens to settle a reservation on (0 on an error; None when the
    client left, so what was reserved stays spent)."""

    def __init__(self, req, window: int = 0, on_done=None, keep_text: bool = False):
        self.model, self.chat, self.stream = req.model, req.chat, req.stream
        self.include_usage, self.n = req.include_usage, req.n
        self.ends = {}  # n > 1: the choices' END payloads by index
        self.on_done, self.keep_text = on_done, keep_text
        self.cache_header = [(b"x-tidegate-cache", b"miss")]
        self.first = asyncio.get_running_loop().create_future()
        self.id = self.id_prefix(req.chat) + os.urandom(12).hex()
        self.created = int(time.time())
        self.sse: Stream | None = None
        self.link, self.rid = None, 0  # the WorkerClient (or RemoteModel) its sequence runs on
        self._full_text = ""  # streamed deltas so far, for the caches
        self._offsets: dict[int, int] = {}  # completions logprobs: text_offset of each choice's next token
        # (forced, names) when the answer may be tool calls: the text is held and parsed at END
        plan = req.tools
        self.tools = (plan.grammar is not None, {t["name"] for t in plan.tools}) \
            if plan is not None and plan.choice != "none" else None
        self._held = ""
        self.last_event = 0.0  # loop time of the last inference event (the watchdog reads it)
        self.done = False
        self._timer = None  # the watchdog's: cancelled once the generation is over (it held the request)
        # flow control (streams): deltas taken since credit last went back to the sequence
        self.window = window if req.stream else 0
        self.unacked = 0

    @staticmethod
    def id_prefix(chat: bool) -> str:
        return "chatcmpl-" if chat else "cmpl-"

    def attach(self, link, rid: int) -> None:
        self.link, self.rid = link, rid

    def served_by(self, model: str, backend: str = "", fallback: bool = False) -> None:
        """The answer comes from another model than the one asked for: a fallback model of the
        chain (x-tidegate-fallback), a remote backend (x-tidegate-backend, and its own model's
        name in the answer). Said as long as nothing went out."""
        if self.sse is not None or self.first.done():
            return
        self.model = model
        name = b"x-tidegate-fallback" if fallback else b"x-tidegate-backend"
        self.cache_header = [h for h in self.cache_header if h[0] != name]
        if fallback or backend:
            self.cache_header.append((name, (model if fallback else backend).encode("utf-8", "replace")[:200]))

    def _over(self, used, entry=None) -> None:
        """The request's bookkeeping, once (the route's on_done)."""
        if self._timer is not None:
            self._timer.cancel()  # a finished request must not live on in the loop's timer heap
            self._timer = None
        done, self.on_done = self.on_done, None
        if done is not None:
            done(entry, used)

    def watch(self, idle: float, first: float) -> None:
        """An ingress-side deadline: a generation whose first event does not come within `first`
        seconds (the queue's own deadline plus `idle`), or whose next one does not come within
        `idle` (a lost END, a wedged worker), is answered 504, or ends its stream with an error
        event, and is cancelled. One timer per generation, re-armed only when it fires."""
        loop = asyncio.get_running_loop()
        self.last_event = loop.time()
        started = self.last_event

        def check():
            if self.done:
                return
            limit = idle if self.last_event > started else first
            late = loop.time() - self.last_event
            if late < limit:
                self._timer = loop.call_later(limit - late, check)
                return
            self._timer = None
            self.client_left()
            if self.sse is not None and self.sse.on_drain is not None:  # paused: it is the reader that stalled
                self.on_event(ERR, failure(504, f"the client read nothing for {idle:g} s while its stream was "
                                           "paused; the generation was cancelled", "reader_stalled"))
                return
            self.on_event(ERR, failure(504, f"the model sent nothing for {idle:g} s; the generation was cancelled",
                                       "generation_timeout"))
        # first look after `idle`: armed at `first` only, a stall right after the first event
        # went unseen until `first` (request_timeout + idle_timeout) had passed
        self._timer = loop.call_later(min(first, idle), check)

    async def replay(self, entry: dict, kind: bytes, extra_headers=()):
        """Answer from a cached entry, streamed or not, exactly as a generation would."""
        self.cache_header = [(b"x-tidegate-cache", kind), *extra_headers]
        self.on_done = None  # a replayed answer is not stored again, and holds no reservation
        usage = dict(entry["usage"], cached_tokens=entry["usage"]["prompt_tokens"])
        if self.stream:
            self.on_event(DELTA, delta(entry["text"]))
            self.on_event(END, dict(entry, text="", usage=usage))
        else:
            self.on_event(END, dict(entry, usage=usage))
        return await self.first

    def on_event(self, kind: str, payload) -> None:
        self._handle(kind, payload)
        if kind == DELTA and self.window and (self.n == 1 or "end" not in payload):
            self._took()

    def _took(self) -> None:
        """Flow control: a delta reached the client's connection (or was held here). Credit goes
        back in halves of the window while the connection keeps up; while it is backed up the
        credit is kept, so the sequence pauses a window ahead, until the connection drains."""
        self.unacked += 1
        if self.unacked < max(1, self.window // 2) or self.done:
            return
        if self.sse is not None and self.sse.backed_up:
            self.sse.on_drain = self._give_credit
        else:
            self._give_credit()

    def _give_credit(self) -> None:
        if self.unacked and not self.done and self.rid:
            self.link.credit(self.rid, self.unacked)
        self.unacked = 0

    def _handle(self, kind: str, payload) -> None:
        if self.done:
            return
        if kind == VIA:
            self.last_event = self.first.get_loop().time()
            return self.served_by(str(payload.get("model") or self.model), str(payload.get("backend") or ""))
        if kind == ERR:
            return self._failed(http_error(payload))
        d = read_delta(payload) if kind == DELTA else None
        if self.n > 1:
            return self._choice_event(kind, payload, d)
        if self.tools is not None:
            if kind == DELTA:  # held: whether it is a call is known once the whole text is
                self._held += d.text
                return
            payload = self._calls(payload)
        self.last_event = self.first.get_loop().time()
        if kind == END:
            self.done = True
            ok = payload["finish_reason"] in ("stop", "length") and self.keep_text
            entry = {"text": self._full_text + payload["text"], "finish_reason": payload["finish_reason"],
                     "usage": payload["usage"]} if ok else None
            self._over(payload["usage"]["total_tokens"], entry)
        if not self.stream:
            if kind == END and not self.first.done():
                self.first.set_result(json_response(self._whole([payload], payload["usage"]),
                                                    headers=self.cache_header))
            return
        if kind == DELTA and self.keep_text:
            self._full_text += d.text
        if self.sse is None:
            self._open_stream()
        if kind == DELTA:
            self._stream_delta(d.text, d.logprobs)
        else:
            self._stream_end(payload)
            self.sse.end()

    def _failed(self, err) -> None:
        self.last_event = self.first.get_loop().time()
        self.done = True
        self._over(0)
        if not self.first.done():
            self.first.set_exception(err)
        elif self.sse is not None:  # mid-stream: an error event, then the end
            self._stream_error(err)
            self.sse.end()

    # ---- the answer's shape: chat.completion(.chunk) / text_completion; ResponseReply overrides these
    def _stream_delta(self, text: str, lp) -> None:
        self._chunk(text, None, lp)

    def _stream_end(self, end: dict) -> None:
        if end.get("tool_calls"):  # one chunk with every call, arguments whole
            self._chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(end["tool_calls"])]}, None)
        elif end["text"] or end.get("logprobs"):
            self._chunk(end["text"], None, end.get("logprobs"))
        self._chunk(None, end["finish_reason"])
        if self.include_usage:
            self.sse.write(sse(self._envelope([], _usage(end["usage"]))))
        self.sse.write(DONE)

    def _stream_error(self, err) -> None:
        self.sse.write(sse(err.body()))

    def _open_stream(self) -> None:
        self.sse = Stream(on_close=self.client_left, headers=self.cache_header)
        if not self.first.done():
            self.first.set_result(self.sse)
        self._stream_start()

    def _stream_start(self) -> None:
        if self.chat:  # each choice's first chunk announces the role
            for j in range(self.n):
                self._chunk({"role": "assistant", "content": ""}, None, index=j)

    def _choice_event(self, kind: str, payload, d) -> None:
        """n > 1: DELTA/END of one choice; the answer is complete when all n ended."""
        self.last_event = self.first.get_loop().time()
        if kind == DELTA and d.end is not None:  # a choice that ended while others still run
            kind, payload = END, d.end
        i = payload["index"] if kind == END else d.index
        if self.stream:
            if self.sse is None:
                self._open_stream()
            if kind == DELTA:
                self._chunk(d.text, None, d.logprobs, index=i)
            else:
                if payload["text"] or payload.get("logprobs"):
                    self._chunk(payload["text"], None, payload.get("logprobs"), index=i)
                self._chunk(None, payload["finish_reason"], index=i)
        if kind != END:
            return
        self.ends[i] = payload
        if len(self.ends) < self.n:
            return
        self.done = True
        ends = [self.ends[j] for j in range(self.n)]
        u = ends[0]["usage"]
        completion = sum(e["usage"]["completion_tokens"] for e in ends)
        usage = {"prompt_tokens": u["prompt_tokens"], "completion_tokens": completion,
                 "total_tokens": u["prompt_tokens"] + completion, "cached_tokens": u["cached_tokens"]}
        self._over(usage["total_tokens"])  # (n choices are not cached: an entry holds one)
        if not self.stream:
            if not self.first.done():
                self.first.set_result(json_response(self._whole(ends, usage), headers=self.cache_header))
            return
        if self.include_usage:
            self.sse.write(sse(self._envelope([], _usage(usage))))
        self.sse.write(DONE)
        self.sse.end()

    def client_left(self) -> None:
        """The client went away: stop its sequence at the next step. What was reserved stays
        spent (part of it was generated, and a refund must never exceed what was unused)."""
        if self.link is not None:
            self.link.cancel(self.rid)
        self._over(None)  # no END will come for a cancelled sequence

    def _envelope(self, choices: list, usage=None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _chunk(self, delta, finish, lp=None, index: int = 0) -> None:
        logprobs = self._logprobs(lp, index) if lp is not None else None
        if self.chat:
            d = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
            choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
        self.sse.write(sse(self._envelope([choice])))

    def _logprobs(self, entries: list, index: int = 0) -> dict:
        """The inference worker's [token, logprob, bytes, top] entries in the route's shape."""
        if self.chat:
            return {"content": token_logprobs(entries), "refusal": None}
        offsets, at = [], self._offsets.get(index, 0)
        for t, *_ in entries:
            offsets.append(at)
            at += len(t)
        self._offsets[index] = at
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [{tt: tv for tt, tv, _ in e[3]} for e in entries], "text_offset": offsets}

    def _calls(self, end: dict) -> dict:
        """END with the held text parsed: tool calls (finish_reason tool_calls), else the text."""
        text = self._held + end["text"]
        forced, names = self.tools
        calls = None
        if end["finish_reason"] == "stop" or not forced:
            try:
                calls = parse_calls(text, forced, names)
            except ValueError:
                calls = None
        if calls is None:
            return dict(end, text=text)
        return dict(end, text="", tool_calls=calls, finish_reason="tool_calls")

    def _whole(self, ends: list, usage: dict) -> dict:
        """The JSON answer: one choice per END, in index order."""
        choices = []
        for i, end in enumerate(ends):
            lp = self._logprobs(end["logprobs"], i) if end.get("logprobs") is not None else None
            if self.chat:
                message = {"role": "assistant", "content": end["text"]}
                if end.get("tool_calls"):
                    message = {"role": "assistant", "content": None, "tool_calls": end["tool_calls"]}
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": end["finish_reason"]})
            else:
                choices.append({"index": i, "text": end["text"], "logprobs": lp, "finish_reason": end["finish_reason"]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": _usage(usage)}


def token_logprobs(entries: list) -> list[dict]:
    """The inference worker's [token, logprob, bytes, top] entries as OpenAI's per-token objects."""
    return [{"token": t, "logprob": v, "bytes": b,
             "top_logprobs": [{"token": tt, "logprob": tv, "bytes": tb} for tt, tv, tb in top]}
            for t, v, b, top in entries]


def _usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}
