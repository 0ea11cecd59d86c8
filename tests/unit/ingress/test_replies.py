"""routes/replies.py without the daemon: DELTA / END / ERR sequences in, the answer's bytes out,
and on_done called exactly once with what the route settles and caches."""
import asyncio

import orjson
import pytest

from tidegate.core.http.http11 import HttpError
from tidegate.core.messaging.protocol import DELTA, END, ERR, choice_end, delta, failure
from tidegate.workers.ingress.routes.replies import DONE, Generation, sse
from tidegate.workers.ingress.routes.request import ToolPlan
from tidegate.workers.ingress.routes.responses import ResponseReply


class Req:
    """The fields of a GenRequest a reply reads."""

    def __init__(self, chat=True, stream=False, n=1, tools=None, include_usage=False):
        self.model, self.chat, self.stream, self.n, self.tools = "m", chat, stream, n, tools
        self.include_usage = include_usage


class Sink:
    def __init__(self):
        self.data, self.ended, self.closed, self.backed_up = [], False, False, False

    def write(self, data):
        self.data.append(data)

    def end(self):
        self.ended = True

    def events(self) -> list:
        """The SSE data payloads, parsed (b'[DONE]' as it is)."""
        out = []
        for frame in b"".join(self.data).split(b"\n\n"):
            for line in frame.split(b"\n"):
                if line.startswith(b"data: "):
                    body = line[6:]
                    out.append(body if body == b"[DONE]" else orjson.loads(body))
        return out


class Link:
    def __init__(self):
        self.cancelled, self.credits = [], []

    def cancel(self, rid):
        self.cancelled.append(rid)

    def credit(self, rid, n):
        self.credits.append((rid, n))


def usage(p=3, c=2):
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cached_tokens": 0}


def drive(req, events, reply=Generation, keep_text=True, window=0):
    """Feed events, return (the first result: a Response or the sink's events; on_done calls)."""
    async def go():
        done = []
        g = reply(req, window, lambda entry, used: done.append((entry, used)), keep_text=keep_text)
        g.attach(Link(), 7)
        for kind, payload in events:
            g.on_event(kind, payload)
        first = await g.first
        if req.stream:
            sink = Sink()
            first.to_sink(sink)
            assert sink.ended
            return sink.events(), done, g
        return orjson.loads(first.body), done, g
    return asyncio.run(go())


def test_sse_framing():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse({"a": 1}, "response.created") == b'event: response.created\ndata: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"


def test_one_choice_whole_body_and_on_done_once():
    body, done, _ = drive(Req(), [(DELTA, delta("Hel")), (DELTA, delta("lo")),
                                  (END, {"text": "!", "finish_reason": "stop", "usage": usage()})])
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": "!"}
    assert body["usage"]["total_tokens"] == 5
    # (not streamed: the inference worker sends the whole text at END; streamed deltas are kept)
    assert done == [({"text": "!", "finish_reason": "stop", "usage": usage()}, 5)]


def test_one_choice_streamed_chunks_in_order_with_usage():
    events, done, _ = drive(Req(stream=True, include_usage=True),
                            [(DELTA, delta("Hel")), (DELTA, delta("lo")),
                             (END, {"text": "", "finish_reason": "length", "usage": usage()})])
    deltas = [e["choices"][0]["delta"] for e in events[:-2] if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("content") for d in deltas[1:3]] == ["Hel", "lo"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["total_tokens"] == 5 and events[-1] == b"[DONE]"
    assert done == [({"text": "Hello", "finish_reason": "length", "usage": usage()}, 5)]


def test_an_error_before_any_byte_is_the_status_and_refunds():
    async def go():
        done = []
        g = Generation(Req(), 0, lambda e, u: done.append((e, u)))
        g.on_event(ERR, failure(503, "full", "queue_full"))
        with pytest.raises(HttpError) as err:
            await g.first
        return err.value, done
    err, done = asyncio.run(go())
    assert (err.status, err.code) == (503, "queue_full") and done == [(None, 0)]


def test_an_error_mid_stream_is_an_error_event_then_the_end():
    events, done, _ = drive(Req(chat=False, stream=True),
                            [(DELTA, delta("a")), (ERR, failure(500, "boom", "internal"))])
    assert events[0]["object"] == "text_completion" and events[0]["choices"][0]["text"] == "a"
    assert events[-1]["error"]["code"] == "internal" and done == [(None, 0)]


def test_three_choices_streamed_and_whole():
    seq = [(DELTA, delta("a", index=0)), (DELTA, delta("b", index=2)),
           (DELTA, choice_end(2, {"text": "", "finish_reason": "stop", "usage": usage(3, 1), "index": 2})),
           (DELTA, delta("c", index=1)),
           (DELTA, choice_end(0, {"text": "", "finish_reason": "stop", "usage": usage(3, 1), "index": 0})),
           (END, {"text": "d", "finish_reason": "length", "usage": usage(3, 2), "index": 1})]
    body, done, _ = drive(Req(chat=False, n=3), seq)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length", "stop"]
    assert body["choices"][1]["text"] == "d" and body["usage"]["completion_tokens"] == 4
    assert done == [(None, 7)]  # n choices are never cached
    events, _, _ = drive(Req(chat=False, n=3, stream=True), seq)
    by_index = {}
    for e in events[:-1]:
        c = e["choices"][0]
        by_index.setdefault(c["index"], []).append(c["text"])
    assert "".join(by_index[0]) == "a" and "".join(by_index[1]) == "cd" and "".join(by_index[2]) == "b"
    assert events[-1] == b"[DONE]"


def test_logprobs_travel_with_their_delta():
    lp = [["Hi", -0.5, [72, 105], [["Hi", -0.5, [72, 105]], ["Yo", -1.5, [89, 111]]]]]
    events, _, _ = drive(Req(stream=True), [(DELTA, delta("Hi", lp)),
                                            (END, {"text": "", "finish_reason": "stop", "usage": usage()})])
    c = events[1]["choices"][0]
    assert c["delta"]["content"] == "Hi" and c["logprobs"]["content"][0]["top_logprobs"][1]["token"] == "Yo"


def test_a_forced_tool_call_is_held_and_parsed_at_the_end():
    plan = ToolPlan([{"name": "get_weather", "description": "", "parameters": {}}], "get_weather", "g")
    text = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    body, done, _ = drive(Req(tools=plan), [(DELTA, delta(text[:10])),
                                            (END, {"text": text[10:], "finish_reason": "stop", "usage": usage()})])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and orjson.loads(call["arguments"]) == {"city": "Oslo"}
    assert done[0][1] == 5


def test_a_cache_replay_looks_like_a_generation_and_is_not_stored_again():
    async def go():
        done = []
        g = Generation(Req(stream=True), 0, lambda e, u: done.append((e, u)), keep_text=True)
        stream = await g.replay({"text": "cached", "finish_reason": "stop", "usage": usage(4, 1)}, b"exact")
        sink = Sink()
        stream.to_sink(sink)
        return sink.events(), stream.headers, done
    events, headers, done = asyncio.run(go())
    assert (b"x-tidegate-cache", b"exact") in headers
    assert events[1]["choices"][0]["delta"]["content"] == "cached" and events[-1] == b"[DONE]"
    assert done == []


def test_the_client_leaving_cancels_and_keeps_the_reservation():
    async def go():
        done = []
        g = Generation(Req(stream=True), 0, lambda e, u: done.append((e, u)))
        link = Link()
        g.attach(link, 9)
        g.client_left()
        g.client_left()
        return link.cancelled, done
    cancelled, done = asyncio.run(go())
    assert cancelled == [9, 9] and done == [(None, None)]


def test_credit_goes_back_in_halves_of_the_window():
    async def go():
        g = Generation(Req(stream=True), 4, None)
        link = Link()
        g.attach(link, 3)
        for t in "abcde":
            g.on_event(DELTA, delta(t))
        return link.credits
    assert asyncio.run(go()) == [(3, 2), (3, 2)]


def test_responses_events_are_typed_and_numbered():
    echo = {"instructions": None}
    events, done, _ = drive(Req(stream=True), [(DELTA, delta("Hi")),
                                               (END, {"text": "", "finish_reason": "stop", "usage": usage()})],
                            reply=lambda *a, **kw: ResponseReply(echo, *a, **kw))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hi"
    assert done[0][1] == 5
