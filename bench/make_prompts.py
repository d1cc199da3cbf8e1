"""Write the benchmark prompt sets (JSONL, one ``{"prompt": ...}`` per line).

    python bench/make_prompts.py

- ``code_heldout.jsonl``: held-out standard-library functions (never trained on): the
  signature, the docstring and the first body lines.
- ``code_edit.jsonl``: a held-out function, then a request for a copy of it: the answer
  repeats the context (where lookup-style drafters shine).
- ``stories.jsonl``: story openings for stories260K.

Code prompts end on the last line's text, not on a newline: the tokenizer merges a newline
with the next line's indentation into one token, so a prompt ending in a bare newline
hands the model a token that in training text only ever precedes a blank line or
top-level code, and it abandons the function.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from leapc.models import corpus

OUT = Path(__file__).resolve().parent / "prompts"
STORY_OPENINGS = (
    "Once upon a time, there was a little girl named Lily.",
    "One day, a little boy named Tom went to the park.",
    "Once upon a time, there was a big, red ball.",
    "Sue had a cat named Max. Max liked to",
    "The sun was shining and the birds were singing.",
    "Tim and his mom went to the store.",
    "Once upon a time, in a small house, there lived an old dog.",
    "Anna found a shiny key in the garden.",
    "One day, Ben saw a bird that could not fly.",
    "Lily wanted to bake a cake for her friend.",
    "There was a little car that liked to go fast.",
    "Once upon a time, a frog lived in a pond.",
    "Mia loved to draw pictures of the sky.",
    "The boy had a toy boat. He took it to the lake.",
    "One morning, Sam woke up and saw snow outside.",
    "Once upon a time, there was a kind king.",
)


def documented_functions(limit: int) -> list[tuple[ast.FunctionDef, list[str]]]:
    found = []
    for file in corpus.read_stdlib():
        if not file.held_out:
            continue
        try:
            tree = ast.parse(file.text)
        except SyntaxError:
            continue
        lines = file.text.splitlines()
        for node in ast.walk(tree):
            if (isinstance(node, ast.FunctionDef) and ast.get_docstring(node)
                    and len(node.body) >= 3 and node.end_lineno - node.lineno < 40):
                found.append((node, lines))
                break  # one function per file: variety across modules
        if len(found) == limit:
            break
    return found


def heldout_prompt(node: ast.FunctionDef, lines: list[str]) -> str:
    body_start = node.body[1].lineno  # the statement after the docstring
    return "\n".join(lines[node.lineno - 1 : body_start + 1])


def edit_prompt(node: ast.FunctionDef, lines: list[str]) -> str:
    source = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
    header = lines[node.lineno - 1][indent:]
    return f"{source}\n\n# An unchanged copy of {node.name}, for comparison:\n{header}"


def write(name: str, prompts: list[str]) -> None:
    with (OUT / name).open("w") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    print(f"{name}: {len(prompts)} prompts")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    functions = documented_functions(24)
    write("code_heldout.jsonl", [heldout_prompt(n, lines) for n, lines in functions[:16]])
    write("code_edit.jsonl", [edit_prompt(n, lines) for n, lines in functions[:16]
                              if n.end_lineno - n.lineno < 25][:12])
    write("stories.jsonl", list(STORY_OPENINGS))


if __name__ == "__main__":
    main()
