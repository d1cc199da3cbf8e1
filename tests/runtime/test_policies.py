"""The policy registry: what each policy needs, what an engine offers, what loads for it."""

from __future__ import annotations

import engines
import pytest

import leapc
from leapc.ir.errors import InputError
from leapc.runtime.manifest import Manifest, read_manifest
from leapc.runtime.policies import (
    POLICIES,
    DraftOptions,
    Policy,
    offered_policies,
    required_programs,
)

HYDRA = {"kind": "hydra", "num_heads": 2, "num_blocks": 1, "placement": "program",
         "tree": [[0], [0, 0]], "tree_choice": {"source": "default"}, "top1": [0.5, 0.4],
         "top5": [0.9, 0.8], "sha256": {}}
ADAPTER = {"steps": 1, "seconds": 1.0, "agreement_before": 0.5, "agreement_after": 0.6,
           "depth": 2, "confidence": 0.3, "ar_tokens_per_s": 100.0, "sweep": [], "sha256": {}}
TRAINING_FREE = {Policy(name) for name in engines.TRAINING_FREE}


@pytest.fixture
def tiny(engine_dir) -> dict:
    """The tiny engine's manifest as data: only ``full``, the training-free policies."""
    return read_manifest(engine_dir("tiny-llama")).model_dump(mode="json")


def with_sections(data: dict, **sections) -> Manifest:
    """``data`` with ``sections`` and the programs they describe (copies of ``full``)."""
    programs = dict(data["programs"])
    for name in ("draft_model", "heads", "draft", "remainder", "kangaroo", "skip_0", "skip_1"):
        programs[name] = programs["full"]
    return Manifest.model_validate(data | {"programs": programs} | sections)


def test_every_policy_has_one_spec():
    assert set(POLICIES) == set(Policy)


def test_the_tiny_engine_offers_the_training_free_policies(tiny):
    assert set(offered_policies(Manifest.model_validate(tiny))) == TRAINING_FREE


@pytest.mark.parametrize("sections, added", [
    ({"draft_model": "model"}, {Policy.DRAFT}),
    ({"heads": HYDRA}, {Policy.HYDRA, Policy.HYDRA_DYNAMIC}),
    ({"heads": HYDRA | {"kind": "medusa"}}, {Policy.MEDUSA, Policy.MEDUSA_DYNAMIC}),
    ({"exit_layer": 1}, {Policy.EARLY_EXIT}),
    ({"exit_layer": 1, "adapter": ADAPTER}, {Policy.EARLY_EXIT, Policy.KANGAROO}),
    ({"skip": "a1", "skip_choice": {"source": "given", "depth": 3, "candidates": ["m0", "a1"]}},
     {Policy.LAYER_SKIP, Policy.SWIFT}),
])
def test_a_section_offers_its_policies(tiny, sections, added):
    if sections.get("draft_model") == "model":
        sections = {"draft_model": tiny["model"]}
    manifest = with_sections(tiny, **sections)
    assert set(offered_policies(manifest)) == TRAINING_FREE | added


def test_int8_engines_draft_only_with_width_invariant_attention(tiny):
    """The one place the int8 rule lives: drafting policies verify in wider steps, whose
    int8 logits differ from a one-token step's unless attention is width-invariant (the
    ONNX lowering up to 1024 keys, leapc's kernel at any length)."""
    fused = with_sections(tiny | {"quantization": "int8", "attention": "tree",
                                  "policies": ["ar"]}, exit_layer=1)
    assert offered_policies(fused) == (Policy.AR,)
    assert POLICIES[Policy.LOOKUP].missing(fused) == \
        "needs float weights or --attention kernel|invariant to draft (the engine is int8, " \
        "attention tree)"
    older = {key: value for key, value in tiny.items() if key != "attention"}
    unrecorded = with_sections(older | {"quantization": "int8", "policies": ["ar"]})
    assert "attention not recorded" in POLICIES[Policy.LOOKUP].missing(unrecorded)
    invariant = with_sections(tiny | {"quantization": "int8", "attention": "invariant"},
                              exit_layer=1)
    assert set(offered_policies(invariant)) == TRAINING_FREE | {Policy.EARLY_EXIT}


def test_int8_engines_longer_than_the_invariant_limit_offer_ar_only(tiny):
    programs = {name: entry | {"signature": entry["signature"] | {"max_seq": 2048}}
                for name, entry in tiny["programs"].items()}
    model = tiny["model"] | {"max_positions": None}
    fields = tiny | {"quantization": "int8", "attention": "invariant", "max_seq": 2048,
                     "programs": programs, "model": model, "policies": ["ar"]}
    long = with_sections(fields)
    assert offered_policies(long) == (Policy.AR,)
    assert POLICIES[Policy.RECYCLE].missing(long) == \
        "needs --max-seq <= 1024 to draft on int8 weights (the engine's is 2048)"
    kernel = with_sections(fields | {"attention": "kernel"})
    assert set(offered_policies(kernel)) == TRAINING_FREE  # leapc's kernel: any length


def test_the_programs_each_policy_runs(tiny):
    skip = {"source": "given", "depth": 3, "candidates": ["m0", "a1"]}
    manifest = with_sections(tiny, exit_layer=1, adapter=ADAPTER, skip="a1", skip_choice=skip,
                             heads=HYDRA | {"placement": "step"})
    expected = {Policy.AR: (), Policy.EARLY_EXIT: ("draft", "remainder"),
                Policy.KANGAROO: ("kangaroo", "remainder"),
                Policy.LAYER_SKIP: ("skip_1",),  # the chosen set's draft only
                Policy.SWIFT: ("skip_0", "skip_1"),
                Policy.HYDRA: ()}  # step placement: the heads run inside "full"
    for policy, programs in expected.items():
        assert required_programs(manifest, policy) == ("full", *programs), policy


def test_load_opens_only_the_programs_of_the_policies_named(exit_engine_dir):
    engine = leapc.load(exit_engine_dir("tiny-llama"), policies=["early-exit"])
    early_exit = ("full", "draft", "remainder", "draft_chain")
    assert set(engine.manifest.programs) == {*early_exit, "kangaroo"}
    assert engine.loaded_programs == early_exit
    engine.generate([5, 6, 7], 4, policy="lookup")
    assert engine.loaded_programs == early_exit
    engine.generate([5, 6, 7], 4, policy="kangaroo", draft=DraftOptions(confidence=0.01))
    assert engine.loaded_programs == (*early_exit, "kangaroo")


def test_load_refuses_a_policy_the_engine_lacks(engine_dir):
    with pytest.raises(InputError, match="does not support policy 'swift'"):
        leapc.load(engine_dir("tiny-llama"), policies=["swift"])
