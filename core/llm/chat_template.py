"""Chat messages -> prompt text with the model's Jinja chat template (from the GGUF metadata
unless the config names one), rendered in Jinja's sandbox: a template comes with a model file
and is not trusted code."""
from __future__ import annotations

import json
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# for models without a template: simple turn markers (the demo model ships this one too)
FALLBACK = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


class TemplateRefused(ValueError):
    """The model's chat template refused the messages (it raised: roles that do not alternate, a
    system message where none may be, …): the client's request, answered 400."""


def _raise(message):
    raise TemplateRefused(message)


def render_chat(template: str | None, messages: list[dict], eos_token: str = "</s>", tools=None) -> str:
    """The prompt for messages ([{role, content}], content already plain text). bos_token is
    empty because tokenization adds BOS itself. tools ([{name, description, parameters}]) go to
    a template that takes them; for one that does not, they become a system message and earlier
    calls are written into their assistant turns."""
    template = template or FALLBACK
    extra = {}
    if tools:
        if "tools" in template:
            extra["tools"] = [{"type": "function", "function": t} for t in tools]
        else:
            from tidegate.core.llm.tools import system_prompt
            messages = [{"role": "system", "content": system_prompt(tools)}, *(_inline_calls(m) for m in messages)]
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                         eos_token=eos_token, **extra)
    except TemplateRefused:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # (a template that fails on these messages fails on them alone: still the request's answer)
        raise TemplateRefused(f"{type(e).__name__}: {e}") from None


def _inline_calls(m: dict) -> dict:
    if not m.get("tool_calls"):
        return m
    calls = "".join(f'<tool_call>{{"name": {json.dumps(c["function"]["name"])}, "arguments": '
                    f'{c["function"]["arguments"]}}}</tool_call>' for c in m["tool_calls"])
    return dict(m, content=(m.get("content") or "") + calls)
