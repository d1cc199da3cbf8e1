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
    token_healing: bool = True  # runtime/healing.py: a prompt may end anywhere

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
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: Literal[False] | None = None


def finish_reason(reason: StopReason | None, stopped_by_text: bool) -> str:
    """OpenAI's ``stop`` (EOS or a stop string) or ``length`` (a token budget or the
    engine's max-seq)."""
    return "stop" if stopped_by_text or reason is StopReason.EOS else "length"


class CompletionReply:
    """``text_completion`` objects: the whole reply, or its streamed chunks."""

    prefix = "cmpl"

    def __init__(self, model: str):
        self.id, self.model, self.created = f"{self.prefix}-{uuid.uuid4().hex}", model, int(time.time())

    def _object(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        return self._object("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": finish}], usage)

    def delta(self, text: str) -> dict:
        return self._object("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": None}])

    def end(self, finish: str) -> dict:
        return self._object("text_completion", [{"index": 0, "text": "", "logprobs": None,
                                                  "finish_reason": finish}])

    def usage(self, usage: dict) -> dict:
        return self._object("text_completion", [], usage)


class ChatReply(CompletionReply):
    """``chat.completion`` objects; streamed, the first delta carries the role."""

    prefix = "chatcmpl"
    started = False

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return self._object("chat.completion", [{"index": 0, "message": message,
                                                  "logprobs": None, "finish_reason": finish}],
                            usage)

    def _chunk(self, delta: dict, finish: str | None) -> dict:
        if not self.started:
            delta, self.started = {"role": "assistant", **delta}, True
        return self._object("chat.completion.chunk", [{"index": 0, "delta": delta,
                                                        "logprobs": None,
                                                        "finish_reason": finish}])

    def delta(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def end(self, finish: str) -> dict:
        return self._chunk({}, finish)

    def usage(self, usage: dict) -> dict:
        return self._object("chat.completion.chunk", [], usage)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def error(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
