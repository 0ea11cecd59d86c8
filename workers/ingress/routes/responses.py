"""POST /v1/responses: OpenAI's Responses API over the same generation as chat completions.

A Responses request is translated into the chat request it means (instructions -> a system
message, input items -> messages, function tools and tool_choice -> the chat shapes, text.format
-> response_format, max_output_tokens -> max_tokens) and goes through OpenAIRoutes._generate, so
it is validated, classed, rate-limited, cached and shed exactly like a chat completion; a 400
found there names the Responses parameter (text.format.schema…, not response_format…). What
comes back is shaped by ResponseReply: a `response` object, or the typed SSE events
(response.created … response.output_text.delta … response.completed).

Nothing is stored: `store: true`, `previous_response_id`, `conversation`, `background` and the
other stateful or hosted features are a 400 naming them.
"""
from __future__ import annotations

import os
import re

import orjson

from tidegate.core.http.http11 import HttpError, Stream
from tidegate.workers.ingress.routes.openai import UNSUPPORTED, _bad
from tidegate.workers.ingress.routes.replies import Generation, token_logprobs

# what /v1/responses honours; known Responses features it does not keep are refused as unsupported
FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
          "parallel_tool_calls", "text", "stream", "stream_options", "metadata", "user", "safety_identifier",
          "store", "background", "truncation", "include", "top_logprobs"}
NOT_KEPT = (UNSUPPORTED - FIELDS) | {"previous_response_id", "conversation", "prompt", "reasoning", "max_tool_calls",
                          "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                          "context_management", "moderation"}
LOGPROBS = "message.output_text.logprobs"
# a chat parameter's path -> the Responses parameter a client sent (for the 400s of the chat validation)
RENAMES = [(re.compile(r"^max_tokens"), "max_output_tokens"),
           (re.compile(r"^response_format\.json_schema"), "text.format"),
           (re.compile(r"^response_format"), "text.format"),
           (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
           (re.compile(r"^tool_choice\.function"), "tool_choice"),
           (re.compile(r"^messages\[\d+\].*"), "input")]


class ResponsesRoute:
    def __init__(self, api):
        self.api = api  # the OpenAIRoutes that generates

    def add_to(self, router, guard) -> None:
        router.add("POST", "/v1/responses", guard(self.create))

    async def create(self, req):
        api = self.api
        body = api._body(req)
        for k in body:
            if k in NOT_KEPT or k in ("store", "background") and body[k] not in (None, False):  # (false: as here)
                raise _bad(f"'{k}' is not supported by this server: it keeps no responses or conversations"
                           if k in ("store", "previous_response_id", "conversation", "background")
                           else f"'{k}' is not supported by this server", k, "unsupported_parameter")
            if k not in FIELDS:
                raise _bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")
        chat, echo = self._as_chat(body)
        model = api._model(chat)
        try:
            msgs = api._messages(chat)
            what, plan = {"messages": msgs}, api._tools(chat)
            if plan is not None:
                what["tools"] = plan.tools
            return await api._generate(req, chat, model, what, chat=True, tools=plan,
                                       reply=lambda *a: ResponseReply(echo, *a))
        except HttpError as e:
            if e.status == 400 and e.param:
                _rename(e)
            raise

    def _as_chat(self, body: dict) -> tuple[dict, dict]:
        """The chat-completions body this request means, and the fields its response echoes."""
        chat = {k: body[k] for k in ("model", "temperature", "top_p", "parallel_tool_calls", "stream") if k in body}
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        user = body.get("user", body.get("safety_identifier"))
        if user is not None:
            chat["user"] = user
        msgs = []
        instructions = body.get("instructions")
        if instructions is not None:
            if not isinstance(instructions, str):
                raise _bad("'instructions' must be a string", "instructions")
            msgs.append({"role": "system", "content": instructions})
        msgs += _input_messages(body.get("input"))
        chat["messages"] = msgs
        if "tools" in body:
            chat["tools"] = _tools(body["tools"])
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
        fmt = _text_format(body.get("text"))
        if fmt is not None:
            chat["response_format"] = fmt
        top = body.get("top_logprobs")
        include = body.get("include") or []
        if not isinstance(include, list) or any(i != LOGPROBS for i in include):
            raise _bad(f"'include' may only hold \"{LOGPROBS}\" here", "include", "unsupported_parameter")
        if LOGPROBS in include or top is not None:
            chat["logprobs"], chat["top_logprobs"] = True, top
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or opts.get("include_obfuscation")):
            raise _bad("'stream_options.include_obfuscation' is not supported (stream events carry no padding)",
                       "stream_options.include_obfuscation", "unsupported_parameter")
        if body.get("truncation") not in (None, "disabled"):
            raise _bad("'truncation' must be \"disabled\" (a prompt past the context is a 400)", "truncation",
                       "unsupported_parameter")
        meta = body.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in meta.items())):
            raise _bad("'metadata' must be an object of up to 16 string keys (64 chars) and values (512)", "metadata")
        echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
                "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
                "top_logprobs": top, "metadata": meta or {}, "user": body.get("user"),
                "previous_response_id": None, "reasoning": None, "store": False, "background": False,
                "truncation": "disabled"}
        return chat, echo


def _rename(e: HttpError) -> None:
    """A 400 from the chat validation, naming the Responses parameter instead."""
    for pattern, to in RENAMES:
        new = pattern.sub(to, e.param)
        if new != e.param:
            e.message = e.message.replace(e.param, new)
            e.param = new
            return


def _text(content, where: str) -> str:
    """An input item's content: a string, or text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or an array of text parts", where)
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text") \
                or not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{j}]: only input_text and output_text parts are supported", f"{where}[{j}]",
                       "unsupported_parameter")
        out.append(part["text"])
    return "".join(out)


def _input_messages(inp) -> list[dict]:
    """`input` (a string, or message / function_call / function_call_output items) as chat messages."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise _bad("'input' must be a string or a non-empty array of input items", "input")
    msgs = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
            msgs.append({"role": item["role"], "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise _bad(f"{where} must have call_id, name and arguments (a JSON string)", where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant" and "tool_calls" in msgs[-1]:
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}.call_id is required", f"{where}.call_id")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": _text(item.get("output"), f"{where}.output")})
        else:
            raise _bad(f"{where}.type {kind!r} is not supported (message, function_call, function_call_output)",
                       f"{where}.type", "unsupported_parameter")
    return msgs


def _tools(tools):
    """Responses function tools ({type, name, parameters, …}) in the chat shape."""
    if not isinstance(tools, list):
        return tools  # (the chat validation names it)
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise _bad(f"tools[{i}]: only function tools are supported", f"tools[{i}].type", "unsupported_parameter")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict):
        raise _bad("'tool_choice' may be none, auto, required or {\"type\": \"function\", \"name\": …}",
                   "tool_choice", "unsupported_parameter")
    return choice


def _text_format(text):
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format"}:
        raise _bad("'text' may only hold 'format' here", "text", "unsupported_parameter")
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        inner = {k: v for k, v in fmt.items() if k != "type"}
        return {"type": "json_schema", "json_schema": inner}
    return fmt  # json_object, or something the chat validation refuses (named text.format)


class ResponseReply(Generation):
    """One generation answered in the Responses API's shapes."""

    def __init__(self, echo: dict, *args):
        super().__init__(*args)
        self.echo = echo
        self.seq = 0  # sequence_number of the next stream event
        self.msg_id = None  # the output message item, once its first text streamed
        self.text, self.lp = "", []

    @staticmethod
    def id_prefix(chat: bool) -> str:
        return "resp_"

    def _object(self, status: str, output: list, usage=None, end=None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if end is not None and end["finish_reason"] == "length" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "model": self.model, "output": output,
                "usage": usage and _usage(usage), **self.echo}

    def _event(self, kind: str, **fields) -> None:
        fields = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        self.sse.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n")

    def _output(self, end: dict) -> list[dict]:
        """The output items: the function calls, else one assistant message."""
        if end.get("tool_calls"):
            return [{"type": "function_call", "id": "fc_" + c["id"].removeprefix("call_"), "call_id": c["id"],
                     "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"}
                    for c in end["tool_calls"]]
        lp = token_logprobs(end["logprobs"]) if end.get("logprobs") else []
        return [_message(self.msg_id or "msg_" + os.urandom(12).hex(), _status(end), self.text + end["text"],
                         self.lp + lp)]

    def _whole(self, ends: list, usage: dict) -> dict:
        return self._object(_status(ends[0]), self._output(ends[0]), usage, ends[0])

    # ---- streamed
    def _open_stream(self) -> None:
        self.sse = Stream(on_close=self.client_left, headers=self.cache_header)
        if not self.first.done():
            self.first.set_result(self.sse)
        self._event("response.created", response=self._object("in_progress", []))
        self._event("response.in_progress", response=self._object("in_progress", []))

    def _stream_delta(self, text: str, lp) -> None:
        if self.msg_id is None:
            self.msg_id = "msg_" + os.urandom(12).hex()
            self._event("response.output_item.added", output_index=0,
                        item={"id": self.msg_id, "type": "message", "status": "in_progress", "role": "assistant",
                              "content": []})
            self._event("response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        lps = token_logprobs(lp) if lp else []
        self.text += text
        self.lp += lps
        if text or lps:
            self._event("response.output_text.delta", item_id=self.msg_id, output_index=0, content_index=0,
                        delta=text, logprobs=lps)

    def _stream_end(self, end: dict) -> None:
        if end.get("tool_calls"):
            output = self._output(end)
            for i, item in enumerate(output):
                self._event("response.output_item.added", output_index=i,
                            item=dict(item, arguments="", status="in_progress"))
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                            delta=item["arguments"])
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                            name=item["name"], arguments=item["arguments"])
                self._event("response.output_item.done", output_index=i, item=item)
        else:
            self._stream_delta(end["text"], end.get("logprobs"))
            item = _message(self.msg_id, _status(end), self.text, self.lp)
            part = item["content"][0]
            self._event("response.output_text.done", item_id=self.msg_id, output_index=0, content_index=0,
                        text=self.text, logprobs=self.lp)
            self._event("response.content_part.done", item_id=self.msg_id, output_index=0, content_index=0, part=part)
            self._event("response.output_item.done", output_index=0, item=item)
            output = [item]
        status = _status(end)
        self._event("response.completed" if status == "completed" else "response.incomplete",
                    response=self._object(status, output, end["usage"], end))

    def _stream_error(self, err) -> None:
        e = err.body()["error"]
        self._event("error", code=e["code"], message=e["message"], param=e["param"])
        failed = dict(self._object("failed", []), error={"code": e["code"] or "server_error", "message": e["message"]})
        self._event("response.failed", response=failed)


def _status(end: dict) -> str:
    return "incomplete" if end["finish_reason"] == "length" else "completed"


def _message(item_id: str, status: str, text: str, lp: list) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": lp}]}


def _usage(u: dict) -> dict:
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": u["cached_tokens"]},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}
