"""The held-out next-line benchmark (leapc/quality.py): its cases are real continuations
of held-out files, and its scores count what they say."""

from __future__ import annotations

import pytest

from leapc import quality
from leapc.models import corpus


def test_cases_are_held_out_lines_cut_at_their_start_or_inside():
    chosen = quality.cases(20, seed=3)
    held_out = [f.text for f in corpus.read_stdlib() if f.held_out]
    assert [c.cut for c in chosen] == list(quality.CUTS) * 10
    for case in chosen:
        assert case.rest.strip()
        whole = case.prompt + case.rest
        assert any(whole in text for text in held_out)  # the file's own text, unaltered
        if case.cut == "line start":
            assert case.prompt.endswith("\n")
        else:
            assert not case.prompt.endswith("\n") and case.prompt.split("\n")[-1].strip()


@pytest.mark.parametrize("line, word", [("        return x", "        return"),
                                        ("    self.a = 1", "    self"), ("(a, b)", "("),
                                        ("", "")])
def test_first_word_is_the_indentation_and_one_word_or_symbol(line, word):
    assert quality.first_word(line) == word


class _Scripted:
    """An engine stand-in whose completions are fixed by healing on or off."""

    def __init__(self, lines: dict[bool, str]):
        self.lines = lines

    def stream(self, prompt, max_new_tokens, token_healing):
        class Chunk:
            text = self.lines[token_healing] + "\nmore"
        return [Chunk()]


def test_scores_count_exact_and_first_word_matches():
    chosen = [quality.Case("def f():\n", "    return 1", "line start"),
              quality.Case("x = fo", "o(1)", "mid-line")]
    scores = quality.next_line_scores(_Scripted({False: "", True: "    return 1"}), chosen)
    by = {(s.cut, s.healing): (s.exact, s.first_word) for s in scores}
    assert by[("line start", False)] == (0.0, 0.0)
    assert by[("line start", True)] == (1.0, 1.0)
    assert by[("mid-line", True)] == (0.0, 0.0)
    assert "| line start | on | 1 | 100.0% | 100.0% |" in quality.markdown(scores)
