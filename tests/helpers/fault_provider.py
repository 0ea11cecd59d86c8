"""A fake OpenAI-compatible provider that fails on purpose: the model name a request asks for
selects the fault (a backend's `model` in tidegate's config picks it). It runs on loopback in a
thread of its own and records every attempt (when, which fault, the body), so a test can say
how many attempts a request cost and how far apart they were.

The answer to a request is the words " w0 w1 … w{N-1}" (N = max_tokens, default 60), one
streamed delta a word, then a finish_reason, a usage chunk and [DONE]. A request whose last
message is the assistant's (or a completion whose prompt ends in words of the answer) is a
continuation: the words already there are not sent again.

Faults (the model name; `:N` sets the number):
    ok                  a healthy answer
    429-retry-after:N   429 with Retry-After: N (seconds) on every attempt
    429                 429 without Retry-After
    500-once            500 on the first attempt of a prompt, then healthy
    503                 503 on every attempt
    reset               reads the request, then resets the connection before any answer
    silent              reads the request and never answers (no headers)
    slow-first:N        headers at once, the first token after N seconds
    cut:N               N deltas, then the connection is cut (no finish_reason, no [DONE])
    stall:N             N deltas (default 20), then nothing for 30 s
    malformed           one chunk of broken JSON among healthy ones
    no-done             a healthy stream that ends with finish_reason and usage but no [DONE]
    context             400 context_length_exceeded
    filter              400 content_filter
    down                503 while the provider's `down_until` (monotonic) is in the future
    no-prefill          healthy, but a trailing assistant message is refused with a 400
    intent              a model whose answers mean something: the answer is `answers[text]` for a
                        last user message listed there, else `intents[k]` for the first keyword
                        k it holds (lower case), else "unknown" (the semantic cache's verifier
                        compares such answers; bench/semantic_fill.py lists labelled texts)
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from aiohttp import web

DEFAULT_WORDS = 60


def words_of(text: str) -> int:
    """How many words of the answer `text` already holds (" w0 w1 …" -> its count)."""
    n = 0
    for part in text.split():
        if part != f"w{n}":
            break
        n += 1
    return n


class FaultProvider:
    def __init__(self):
        self.attempts: list[tuple[float, str, dict]] = []  # (monotonic time, model, body)
        self.down_until = 0.0
        self.intents: dict[str, str] = {}  # the "intent" model: keyword -> its answer
        self.answers: dict[str, str] = {}  # ... and whole texts -> their answer
        self.held = False        # hold(): the intent model keeps its answers until release()
        self._gate: asyncio.Event | None = None
        self.in_flight = 0       # intent requests received and not yet answered
        self._seen: set[str] = set()  # 500-once: prompts that failed once
        self._ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._run, daemon=True).start()
        if not self._ready.wait(30):
            raise RuntimeError("the fault provider did not start")

    # ---- what a test reads -----------------------------------------------------------------
    def hold(self) -> None:
        """The intent model answers nothing until release() (a test's window, not a delay)."""
        self.held = True

    def release(self) -> None:
        def go():  # (in the provider's loop: no request can slip between the flag and the gate)
            self.held = False
            if self._gate is not None:
                self._gate.set()
                self._gate = None
        self.loop.call_soon_threadsafe(go)

    def count(self, model: str) -> int:
        return sum(1 for _, m, _ in self.attempts if m == model)

    def times(self, model: str) -> list[float]:
        return [t for t, m, _ in self.attempts if m == model]

    def bodies(self, model: str) -> list[dict]:
        return [b for _, m, b in self.attempts if m == model]

    def close(self) -> None:
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)

    async def _stop(self) -> None:
        await self.runner.cleanup()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    # ---- the server ---------------------------------------------------------------------------
    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        self.runner = runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fault", "object": "model"}]})

    async def _chat(self, request):
        body = await request.json()
        model = str(body.get("model", "ok"))
        fault, _, arg = model.partition(":")
        n_arg = float(arg) if arg else None
        self.attempts.append((time.monotonic(), model, body))
        chat = request.path.endswith("chat/completions")
        if fault == "429-retry-after":
            return _error(429, "rate limited", "rate_limit_exceeded", {"Retry-After": str(int(n_arg or 1))})
        if fault == "429":
            return _error(429, "rate limited", "rate_limit_exceeded")
        if fault == "503" or (fault == "down" and time.monotonic() < self.down_until):
            return _error(503, "overloaded", "server_overloaded")
        if fault == "500-once":
            key = json.dumps(body, sort_keys=True)  # (a request unlike any before fails once)
            if key not in self._seen:
                self._seen.add(key)
                return _error(500, "internal error", "server_error")
        if fault == "context":
            return _error(400, "This model's maximum context length is 16 tokens.", "context_length_exceeded",
                          param="messages")
        if fault == "filter":
            return _error(400, "The response was filtered.", "content_filter", param="messages")
        if fault == "reset":
            request.transport.abort()
            await asyncio.sleep(3600)
        if fault == "silent":
            await asyncio.sleep(3600)
        msgs = body.get("messages") or []
        if fault == "intent":
            asked = str(msgs[-1].get("content") if chat and msgs else body.get("prompt", ""))
            answer = self.answers.get(asked) or next((a for k, a in self.intents.items() if k in asked.lower()),
                                                     "unknown")
            self.in_flight += 1
            try:
                if self.held:
                    if self._gate is None:
                        self._gate = asyncio.Event()
                    await self._gate.wait()
                return await self._intent(request, model, chat, bool(body.get("stream")), answer)
            finally:
                self.in_flight -= 1
        prefix = ""
        if chat and msgs and msgs[-1].get("role") == "assistant":
            if fault == "no-prefill":
                return _error(400, "the last message must be the user's", "invalid_request_error", param="messages")
            prefix = msgs[-1].get("content") or ""
        elif not chat:
            prefix = str(body.get("prompt", "")).rpartition("\n")[2]
        total = int(body.get("max_tokens") or DEFAULT_WORDS)
        start = words_of(prefix)
        if not body.get("stream"):
            return await self._whole(request, fault, n_arg, model, chat, prefix, start, total)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = 0
        for i in range(start, total):
            if fault == "slow-first" and sent == 0:
                await asyncio.sleep(n_arg or 20)
            if fault == "cut" and sent >= (n_arg or 40):
                request.transport.close()  # (a FIN mid-body: what was sent arrives, the body never ends)
                return resp
            if fault == "stall" and sent >= (n_arg or 20):
                await asyncio.sleep(30)
            if fault == "malformed" and sent == 3:
                await resp.write(b'data: {"choices": [{"delta": {"content": "w\n\n')
            text = ("" if i == 0 and not prefix else " ") + f"w{i}"
            await resp.write(_chunk(model, chat, text, None))
            sent += 1
        await resp.write(_chunk(model, chat, "", "stop"))
        await resp.write(b"data: " + json.dumps({"choices": [], "model": model, "usage": {
            "prompt_tokens": 10, "completion_tokens": sent, "total_tokens": 10 + sent}}).encode() + b"\n\n")
        if fault != "no-done":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


    async def _intent(self, request, model: str, chat: bool, stream: bool, text: str):
        n = len(text.split())
        usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
        if not stream:
            choice = {"index": 0, "finish_reason": "stop",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return web.json_response({"object": "chat.completion" if chat else "text_completion", "model": model,
                                      "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk(model, chat, text, None))
        await resp.write(_chunk(model, chat, "", "stop"))
        await resp.write(b"data: " + json.dumps({"choices": [], "model": model, "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _whole(self, request, fault, n_arg, model, chat, prefix, start, total):
        """A request that does not stream (a client without a gateway): the same faults, as
        whole answers can meet them."""
        if fault == "slow-first":
            await asyncio.sleep(n_arg or 20)
        if fault == "stall":
            await asyncio.sleep(30)
        text = "".join(("" if i == 0 and not prefix else " ") + f"w{i}" for i in range(start, total))
        choice = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        data = json.dumps({"object": "chat.completion" if chat else "text_completion", "model": model,
                           "choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": total - start,
                                                          "total_tokens": 10 + total - start}}).encode()
        if fault == "cut":  # half the body, then the connection closes
            resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()
            return resp
        return web.Response(body=data, content_type="application/json")


def _chunk(model: str, chat: bool, text: str, finish) -> bytes:
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    return b"data: " + json.dumps({"object": "chat.completion.chunk" if chat else "text_completion",
                                   "model": model, "choices": [choice]}).encode() + b"\n\n"


def _error(status: int, message: str, code: str, headers: dict | None = None, param: str | None = None):
    return web.json_response({"error": {"message": message, "type": "invalid_request_error" if status == 400
                                        else "server_error", "code": code, "param": param}},
                             status=status, headers=headers or {})
