"""Incremental detokenization: the text of a growing token list, emitted once it is final.

Decoding the whole list at every step is quadratic, and a decoder's output for a prefix of
the tokens is not always a prefix of its output for all of them:

- byte-level BPE decodes an incomplete UTF-8 sequence at the end to U+FFFD, which the next
  token may complete into a real character;
- byte-fallback (``<0xE2>`` tokens, SentencePiece models) decodes a run of byte tokens as
  one UTF-8 string, and *every* byte of a run that is not valid UTF-8 becomes U+FFFD: a
  later byte can turn an already complete "é" into three replacement characters;
- SentencePiece decoders drop the leading space of the first token they decode.

So the detokenizer decodes a small window: the tokens of the last emitted piece (the
decoder's context, so a dropped leading space falls in text already emitted) plus the
tokens not emitted yet, and emits the window's new text only when nothing later can change
it. `flush` emits whatever is still held back when generation ends, so the emitted pieces
always join to ``tokenizer.decode(all ids, skip_special_tokens=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
# What the tokenizers ByteFallback decoder reads as one byte: "<0x" two hex digits ">".
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Detokenizer:
    """Feed new token ids with `push`; each call returns the text that became final."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        # Skipped before decoding, so they neither add text nor end a byte-fallback run.
        self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._ids: list[int] = []
        self._prefix = 0  # window start: the first token of the last emitted piece
        self._read = 0  # the text of ids[:read] has been emitted
        self._prefix_text = ""  # decode(ids[prefix:read]), the window's emitted part
        self._open_bytes = False  # the last non-special token is a byte-fallback token

    def push(self, ids: Iterable[int]) -> str:
        """Append ``ids``; return the text they make final ("" while it may still change)."""
        for token in ids:
            self._ids.append(token)
            if token not in self._special:
                self._open_bytes = self._is_byte(token)
        if self._open_bytes:  # the run's next byte may turn all of it into U+FFFD
            return ""
        text = self._decode(self._prefix, len(self._ids))
        if text.endswith(REPLACEMENT) or not text.startswith(self._prefix_text):
            return ""  # a character may be incomplete: wait for the next token
        delta = text[len(self._prefix_text):]
        if delta:
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._prefix, self._read)
        return delta

    def flush(self) -> str:
        """The text still held back: call once, after the last `push`."""
        text = self._decode(self._prefix, len(self._ids))
        # The window always extends its emitted part for the decoders above; should some
        # other decoder rewrite it, emit from where the two agree rather than repeat text.
        kept = len(os.path.commonprefix([text, self._prefix_text]))
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        self._open_bytes = False
        return text[kept:]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def _is_byte(self, token: int) -> bool:
        piece = self._tokenizer.id_to_token(token)
        return piece is not None and _BYTE_TOKEN.fullmatch(piece) is not None
