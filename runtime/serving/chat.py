"""Chat messages to a prompt with the model's own Jinja chat template, rendered as
transformers' ``apply_chat_template`` renders it: a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` for a template's own checks,
``bos_token`` / ``eos_token``, and ``add_generation_prompt`` so the prompt ends where the
assistant's reply begins."""

from __future__ import annotations

from collections.abc import Callable

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from leapc.ir.errors import EngineError, InputError
from leapc.runtime.manifest import Manifest


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        try:
            self.template = environment.from_string(source)
        except TemplateError as err:
            raise EngineError(f"the engine's chat template does not parse ({err})") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def of(cls, manifest: Manifest, token: Callable[[int], str | None]) -> ChatTemplate | None:
        """The engine's template, or None; ``token(id)`` names its special tokens."""
        info = manifest.tokenizer
        if info.chat_template is None:
            return None
        bos = token(info.bos_id) if info.bos_id is not None else ""
        eos = token(info.eos_ids[0]) if info.eos_ids else ""
        return cls(info.chat_template, bos or "", eos or "")

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as err:
            raise InputError(f"the chat template refused the messages: {err}") from None
