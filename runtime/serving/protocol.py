"""The OpenAI API's request and response shapes that `app` serves, as pydantic models.

Fields of OpenAI's API that leapc does not implement are accepted only at their "off"
value (``n=1``, ``echo=false``, no ``logprobs``, zero penalties): a request that asks for
one of them gets a 400 naming it, never a reply that silently ignored it. Unknown fields
are refused the same way. leapc's own options (the decoding policy and its knobs) ride in
the ``leapc`` extension field (``extra_body={"leapc": {...}}`` in OpenAI's client).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from leapc.runtime.decode import StopReason
from leapc.runtime.policies import DraftOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyRequest(_Strict):
    """leapc's extension: the decoding policy for this request and its knobs (the
    server's ``--policy`` otherwise). Every lossless policy returns what ``ar`` would."""

    policy: str | None = None
    max_draft: int | None = Field(None, ge=0)
    ngram: int = Field(4, ge=1)
    matches: int = Field(1, ge=1)
    adaptive: bool = False

    def draft_options(self) -> DraftOptions:
        return DraftOptions(max_draft=self.max_draft, ngram=self.ngram, matches=self.matches,
                            adaptive=self.adaptive)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension, as in vLLM: 0 keeps every token
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # the caller's own tag: accepted, not used
    leapc: PolicyRequest = PolicyRequest()

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias):
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = None


def finish_reason(reason: StopReason | None, stopped_by_text: bool) -> str:
    """OpenAI's ``stop`` (EOS or a stop string) or ``length`` (a token budget or the
    engine's max-seq)."""
    return "stop" if stopped_by_text or reason is StopReason.EOS else "length"


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion(id_: str, model: str, text: str, finish: str | None, usage: dict | None) -> dict:
    """A ``text_completion`` object, or with ``finish`` None and partial ``text`` one
    streamed chunk of it."""
    body = {"id": id_, "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
