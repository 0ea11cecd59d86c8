"""Chat messages -> prompt text with the model's Jinja chat template (from the GGUF metadata
unless the config names one), rendered in Jinja's sandbox: a template comes with a model file
and is not trusted code."""
from __future__ import annotations

from functools import lru_cache

from jinja2.sandbox import ImmutableSandboxedEnvironment

# for models without a template: simple turn markers (the demo model ships this one too)
FALLBACK = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message):
    raise ValueError(message)


def render_chat(template: str | None, messages: list[dict], eos_token: str = "</s>") -> str:
    """The prompt for messages ([{role, content}], content already plain text). bos_token is
    empty because tokenization adds BOS itself."""
    return _compile(template or FALLBACK).render(messages=messages, add_generation_prompt=True, bos_token="",
                                                  eos_token=eos_token)
