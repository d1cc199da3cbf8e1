"""Stop strings on text that arrives in pieces (a stream of detokenized chunks).

A stop string may begin in one chunk and end in a later one, so text that could still be
the start of a stop string is held back until the next chunk decides it. What is emitted
never contains a stop string, and the text after the first one is dropped (as OpenAI's
API does)."""

from __future__ import annotations


class StopText:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of ``held + text`` that is final: up to the first stop string (then
        ``stopped`` is set), else all but a tail that could begin one."""
        if self.stopped:
            return ""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.held = self.held[: min(hits)], ""
            return out
        keep = self._open_prefix()
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """What is held when the text ends: no stop string can complete any more."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _open_prefix(self) -> int:
        """The length of the longest tail of ``held`` that is a proper prefix of a stop."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:size]):
                    longest = size
                    break
        return longest
