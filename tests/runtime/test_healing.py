"""Token healing (runtime/healing.py): a text prompt backed up by its last token, the first
generated token constrained to begin with that token's text; every policy still emits
what `ar` emits with healing on."""

from __future__ import annotations

import numpy as np
import pytest
from engines import require_bundled
from tokenizers import Tokenizer

import leapc
from leapc.benchmark import CODE_PROMPTS
from leapc.models.loaders import BUNDLED_DIR
from leapc.runtime.healing import CompletionText, Healing, TokenTexts, heal

# Prompts that end after a newline, in whitespace, mid-word and mid-expression.
PROMPTS = ("def add(a, b):\n", "class Stack:\n    def push(self, item):\n        ",
           "import os\nimport sy", "for i in range(10):\n    total = tot", "x = [1, 2,")
POLICIES = ("lookup", "suffix", "recycle", "lookahead", "draft", "retrieval")


@pytest.fixture(scope="module")
def texts() -> TokenTexts:
    require_bundled()
    tokenizer = Tokenizer.from_file(str(BUNDLED_DIR / "tokenizer.json"))
    return TokenTexts(tokenizer, tokenizer.get_vocab_size())


def test_a_prompt_ending_in_a_newline_is_backed_up_to_before_it(texts):
    ids = texts.tokenizer.encode("def f(x):\n").ids
    kept, healing = heal(ids, texts)
    assert kept == ids[:-1] and healing.prefix == "\n" and healing.context == ids[-2]
    newline_indent = texts.tokenizer.encode("def f(x):\n    return").ids[-2]
    assert texts.texts[newline_indent].startswith("\n ")  # the merge the model learned
    assert healing.allowed[ids[-1]] and healing.allowed[newline_indent]
    assert not healing.allowed[texts.tokenizer.token_to_id("Ġreturn")]
    allowed = np.flatnonzero(healing.allowed)
    assert all(texts.texts[t].startswith("\n") for t in allowed)
    assert len(allowed) == sum(t.startswith("\n") for t in texts.texts)


def test_starting_with_is_a_scan_of_the_vocabulary(texts):
    """The sorted-run lookup against the definition, for every token's text as a prefix
    (and its first letter, and one no token begins with)."""
    prefixes = {t for t in texts.texts if t} | {t[:1] for t in texts.texts if t} | {"\x00zz"}
    for prefix in sorted(prefixes)[::7] + ["\n", " s", "\x00zz"]:
        scan = np.array([t.startswith(prefix) for t in texts.texts])
        np.testing.assert_array_equal(texts.starting_with(prefix), scan, err_msg=repr(prefix))


def test_a_word_cut_in_pieces_is_backed_up_to_its_start(texts):
    ids = texts.tokenizer.encode("import sy").ids  # ... "import", " s", "y"
    kept, healing = heal(ids, texts)
    assert kept == ids[:-2] and healing.prefix == " sy"
    assert healing.allowed[texts.tokenizer.token_to_id("Ġsys")]
    assert not healing.allowed[texts.tokenizer.token_to_id("Ġos")]


def test_one_token_and_special_token_prompts_are_left_alone(texts):
    assert heal([5], texts) == ([5], None)
    bos = texts.tokenizer.token_to_id("<s>") or 1
    assert heal([532, bos], texts)[1] is None  # a special token has no text to heal


def test_constrain_cuts_every_other_token():
    healing = Healing(0, "a", np.asarray([False, True, True, False]))
    assert healing.constrain(np.asarray([5.0, 1.0, 2.0, 9.0])).tolist() == \
        [-np.inf, 1.0, 2.0, -np.inf]


def test_completion_text_drops_the_healed_prefix_once(texts):
    tokenizer = texts.tokenizer
    ids = tokenizer.encode("def f(x):\n    return x\n").ids
    kept, healing = heal(tokenizer.encode("def f(x):\n").ids, texts)
    completion = CompletionText(tokenizer, healing)
    out = ids[len(kept):]
    text = "".join(completion.push([t]) for t in out) + completion.flush()
    assert text == "    return x\n"
    with pytest.raises(AssertionError, match="healed prefix"):
        CompletionText(tokenizer, healing).push(tokenizer.encode("x").ids[-1:])


@pytest.fixture(scope="module")
def bundled(engine_dir):
    return leapc.load(engine_dir("bundled"))


@pytest.mark.slow  # the bundled engine
@pytest.mark.parametrize("prompt", PROMPTS)
def test_healed_completions_continue_the_prompts_text(bundled, prompt):
    healed = bundled.generate(prompt, 24, token_healing=True)
    ids = bundled.encode(prompt)
    kept, healing = heal(ids, bundled.token_texts)
    full = bundled.tokenizer.decode(kept + healed.token_ids, skip_special_tokens=True)
    prompt_text = bundled.tokenizer.decode(ids, skip_special_tokens=True)
    assert full == prompt_text + healed.text
    assert healed.stats.prompt_tokens == len(kept) < len(ids)
    assert bundled.token_texts.texts[healed.token_ids[0]].startswith(healing.prefix)


@pytest.mark.slow  # the bundled engine
def test_a_newline_prompt_does_not_start_with_a_blank_line(bundled):
    """The demo's complaint: a prompt ending in a bare newline made the model leave the
    function it was given (a blank line, then a new test class). The demo's prompts and
    two more."""
    prompts = [p for p in CODE_PROMPTS if p.endswith("\n")]
    prompts += ["def add(a, b):\n", "class Stack:\n    def push(self, item):\n"]
    assert len(prompts) >= 5
    blank = 0
    for prompt in prompts:
        blank += bundled.generate(prompt, 16).text.startswith("\n")
        healed = bundled.generate(prompt, 16, token_healing=True).text
        assert not healed.startswith("\n") and healed.startswith(" "), prompt
    assert blank >= len(prompts) // 2  # what healing fixes


@pytest.mark.slow  # the bundled engine
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_ar_with_healing_on(bundled, policy):
    for prompt in PROMPTS:
        expected = bundled.generate(prompt, 32, token_healing=True).token_ids
        got = bundled.generate(prompt, 32, policy=policy, token_healing=True).token_ids
        assert got == expected, prompt


@pytest.mark.slow  # the bundled engine
def test_batched_rows_heal_as_they_do_alone(bundled):
    scheduler = bundled.scheduler(4)
    sequences = [bundled.sequence(p, 20, policy="suffix", token_healing=True) for p in PROMPTS]
    for sequence in sequences:
        scheduler.submit(sequence)
    while not scheduler.idle:
        scheduler.step()
    assert [s.token_ids for s in sequences] == \
        [bundled.generate(p, 20, token_healing=True).token_ids for p in PROMPTS]


@pytest.mark.slow  # the bundled engine
def test_sampled_first_tokens_come_from_the_allowed_set(bundled):
    ids = bundled.encode("import os\nimport sy")
    _, healing = heal(ids, bundled.token_texts)
    firsts = {bundled.generate("import os\nimport sy", 1, temperature=1.5, seed=s,
                               token_healing=True).token_ids[0] for s in range(40)}
    assert len(firsts) > 1 and all(healing.allowed[t] for t in firsts)


@pytest.mark.slow  # the bundled engine
def test_token_id_prompts_are_not_healed(bundled):
    ids = bundled.encode("def add(a, b):\n")
    assert bundled.generate(ids, 12, token_healing=True).token_ids == \
        bundled.generate(ids, 12).token_ids


@pytest.mark.slow
@pytest.mark.shared
def test_every_policy_is_ar_with_healing_on_stories(engine_dir):
    engine = leapc.load(engine_dir("stories"))
    for prompt in ("Once upon a time, there was a lit", "One day, Tom went to the ",
                   "Lily loved to play.\n"):
        expected = engine.generate(prompt, 32, token_healing=True)
        for policy in ("lookup", "suffix", "draft", "retrieval"):
            got = engine.generate(prompt, 32, policy=policy, token_healing=True)
            assert got.token_ids == expected.token_ids, (prompt, policy)


def test_a_vocabulary_of_digits_heals_after_a_digit_context():
    """A word-level tokenizer of digits (the tests' tiny models) has no letter token to
    read texts after: any token with text serves."""
    from tokenizers import models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({str(i): i for i in range(40)}, unk_token="0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = TokenTexts(tokenizer, 40)
    kept, healing = heal(tokenizer.encode("5 17 3").ids, texts)
    assert kept == [5, 17] and healing.prefix == " 3"
    assert sorted(np.flatnonzero(healing.allowed)) == [3, *range(30, 40)]


@pytest.mark.slow  # the bundled engines with exits, skips and heads (shared with their tests)
@pytest.mark.parametrize("fixture, args, policies", [
    ("exit_engine_dir", ("bundled",), ("early-exit", "kangaroo")),
    ("skip_engine_dir", ("bundled",), ("layer-skip", "swift")),
    ("heads_engine_dir", ("bundled", "medusa"), ("medusa", "medusa-dynamic")),
    ("heads_engine_dir", ("bundled", "hydra"), ("hydra", "hydra-dynamic")),
])
def test_self_drafting_and_head_policies_are_ar_with_healing_on(request, fixture, args,
                                                                policies):
    engine = leapc.load(request.getfixturevalue(fixture)(*args))
    for prompt in PROMPTS[:3]:
        expected = engine.generate(prompt, 32, token_healing=True).token_ids
        for policy in policies:
            got = engine.generate(prompt, 32, policy=policy, token_healing=True).token_ids
            assert got == expected, (prompt, policy)
