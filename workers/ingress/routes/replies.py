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
from tidegate.core.messaging.protocol import DELTA, END, ERR, http_error


class Generation:
    """One generation in flight: turns inference events into the HTTP answer."""

    def __init__(self, api, model: str, chat: bool, stream: bool, include_usage: bool, n: int = 1):
        self.api, self.model, self.chat, self.stream, self.include_usage = api, model, chat, stream, include_usage
        self.n, self.ends = n, {}  # n > 1: the choices' END payloads by index
        self.reservation = None
        self.store = None  # (key, tenant): put the answer in the exact cache when it ends well
        self.semantic_store = None  # (namespace, tenant, text): and in the semantic cache
        self.cache_header = [(b"x-tidegate-cache", b"miss")]
        self.first = asyncio.get_running_loop().create_future()
        self.id = self.id_prefix(chat) + os.urandom(12).hex()
        self.created = int(time.time())
        self.sse: Stream | None = None
        self.rid = 0
        self._full_text = ""  # streamed deltas so far, for the exact cache
        self._offsets: dict[int, int] = {}  # completions logprobs: text_offset of each choice's next token
        self.tools = None  # (forced, names) when the answer may be tool calls: the text is held and parsed at END
        self._held = ""
        self.last_event = 0.0  # loop time of the last inference event (the watchdog reads it)
        self.done = False
        self.counted = False  # in api.inflight while True
        # flow control (streams): deltas taken since credit last went back to the sequence
        self.window = api.inf["stream_window"] if stream else 0
        self.unacked = 0

    @staticmethod
    def id_prefix(chat: bool) -> str:
        return "chatcmpl-" if chat else "cmpl-"

    def watch(self, idle: float, first: float) -> None:
        """An ingress-side deadline: a generation whose first event does not come within `first`
        seconds (the queue's own deadline plus `idle`), or whose next one does not come within
        `idle` (a lost END, a wedged worker), is answered 504, or ends its stream with an error
        event, and is cancelled. One timer per generation, re-armed only when it fires."""
        loop = asyncio.get_running_loop()
        self.last_event = loop.time()
        started = self.last_event
        self.counted = True
        self.api.inflight += 1

        def check():
            if self.done:
                return
            limit = idle if self.last_event > started else first
            late = loop.time() - self.last_event
            if late < limit:
                loop.call_later(limit - late, check)
                return
            self.client_left()
            if self.sse is not None and self.sse.on_drain is not None:  # paused: it is the reader that stalled
                self.on_event(ERR, [504, f"the client read nothing for {idle:g} s while its stream was paused; "
                                    "the generation was cancelled", "reader_stalled", None])
                return
            self.on_event(ERR, [504, f"the model sent nothing for {idle:g} s; the generation was cancelled",
                                "generation_timeout", None])
        # first look after `idle`: armed at `first` only, a stall right after the first event
        # went unseen until `first` (request_timeout + idle_timeout) had passed
        loop.call_later(min(first, idle), check)

    async def replay(self, entry: dict, kind: bytes, extra_headers=()):
        """Answer from a cached entry, streamed or not, exactly as a generation would."""
        self.cache_header = [(b"x-tidegate-cache", kind), *extra_headers]
        self.store = self.semantic_store = None  # a replayed answer is not stored again
        usage = dict(entry["usage"], cached_tokens=entry["usage"]["prompt_tokens"])
        if self.stream:
            self.on_event(DELTA, entry["text"])
            self.on_event(END, dict(entry, text="", usage=usage))
        else:
            self.on_event(END, dict(entry, usage=usage))
        return await self.first

    def settle(self, used: int) -> None:
        if self.reservation is not None:
            self.api.limiter.settle(self.reservation, used)
            self.reservation = None

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
            self.api.clients[self.model].credit(self.rid, self.unacked)
        self.unacked = 0

    def _handle(self, kind: str, payload) -> None:
        if self.done:
            return
        if self.n > 1 and kind != ERR:
            return self._choice_event(kind, payload)
        if self.tools is not None and kind != ERR:
            if kind == DELTA:  # held: whether it is a call is known once the whole text is
                self._held += payload[0] if payload.__class__ is list else payload
                return
            payload = self._calls(payload)
        self.last_event = self.first.get_loop().time()
        if kind != DELTA:
            self.done = True
            if self.counted:
                self.counted = False
                self.api.inflight -= 1
        if kind == ERR:
            self.settle(0)
            err = http_error(payload)
            if not self.first.done():
                self.first.set_exception(err)
            elif self.sse is not None:  # mid-stream: an error event, then the end
                self._stream_error(err)
                self.sse.end()
            return
        if kind == END and payload["finish_reason"] in ("stop", "length") and (self.store or self.semantic_store):
            entry = {"text": self._full_text + payload["text"], "finish_reason": payload["finish_reason"],
                     "usage": payload["usage"]}
            if self.store is not None:
                self.api.exact.put(self.store[0], self.store[1], entry)
            if self.semantic_store is not None:
                ns, tenant, text = self.semantic_store
                self.api.semantic.insert(ns, tenant, text, entry)
        if not self.stream:
            if kind == END:
                self.settle(payload["usage"]["total_tokens"])
                if not self.first.done():
                    self.first.set_result(json_response(self._whole([payload], payload["usage"]),
                                                        headers=self.cache_header))
            return
        lp = None
        if kind == DELTA and payload.__class__ is list:  # [text, logprob entries] (logprobs asked for)
            payload, lp = payload
        if kind == DELTA and (self.store or self.semantic_store):
            self._full_text += payload
        if self.sse is None:
            self._open_stream()
        if kind == DELTA:
            self._stream_delta(payload, lp)
        elif kind == END:
            self.settle(payload["usage"]["total_tokens"])
            self._stream_end(payload)
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
            self.sse.write(b"data: " + orjson.dumps(self._envelope([], _usage(end["usage"]))) + b"\n\n")
        self.sse.write(b"data: [DONE]\n\n")

    def _stream_error(self, err) -> None:
        self.sse.write(b"data: " + orjson.dumps(err.body()) + b"\n\n")

    def _open_stream(self) -> None:
        self.sse = Stream(on_close=self.client_left, headers=self.cache_header)
        if not self.first.done():
            self.first.set_result(self.sse)
        if self.chat:  # each choice's first chunk announces the role
            for j in range(self.n):
                self._chunk({"role": "assistant", "content": ""}, None, index=j)

    def _choice_event(self, kind: str, payload: dict) -> None:
        """n > 1: DELTA/END of one choice ({index, …}); the answer is complete when all n ended."""
        self.last_event = self.first.get_loop().time()
        if kind == DELTA and "end" in payload:  # a choice that ended while others still run
            kind, payload = END, payload["end"]
        i = payload["index"]
        if self.stream:
            if self.sse is None:
                self._open_stream()
            if kind == DELTA:
                self._chunk(payload["text"], None, payload["logprobs"], index=i)
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
        if self.counted:
            self.counted = False
            self.api.inflight -= 1
        ends = [self.ends[j] for j in range(self.n)]
        u = ends[0]["usage"]
        completion = sum(e["usage"]["completion_tokens"] for e in ends)
        usage = {"prompt_tokens": u["prompt_tokens"], "completion_tokens": completion,
                 "total_tokens": u["prompt_tokens"] + completion, "cached_tokens": u["cached_tokens"]}
        self.settle(usage["total_tokens"])
        if not self.stream:
            if not self.first.done():
                self.first.set_result(json_response(self._whole(ends, usage), headers=self.cache_header))
            return
        if self.include_usage:
            self.sse.write(b"data: " + orjson.dumps(self._envelope([], _usage(usage))) + b"\n\n")
        self.sse.write(b"data: [DONE]\n\n")
        self.sse.end()

    def client_left(self) -> None:
        """The client went away: stop its sequence at the next step. What was reserved stays
        spent (part of it was generated, and a refund must never exceed what was unused)."""
        self.api.clients[self.model].cancel(self.rid)
        self.reservation = None
        if self.counted:  # no END will come for a cancelled sequence
            self.counted = False
            self.api.inflight -= 1

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
        self.sse.write(b"data: " + orjson.dumps(self._envelope([choice])) + b"\n\n")

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
