"""The bundled model is a standard Hugging Face directory of the promised shape."""

from __future__ import annotations

import json

from engines import require_bundled
from transformers import AutoModelForCausalLM, AutoTokenizer

from leapc.models import corpus


def test_bundled_directory_loads_with_auto_classes():
    directory = require_bundled()
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.vocab_size == len(tokenizer) == 8192
    assert cfg.max_position_embeddings == 1024
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 20e6
    assert tokenizer("def f():").input_ids[0] == tokenizer.bos_token_id == cfg.bos_token_id
    assert tokenizer.eos_token == corpus.EOS


def test_bundled_files_are_float16_and_small():
    directory = require_bundled()
    assert (directory / "model.safetensors").stat().st_size <= 40 * 2**20
    header_len = int.from_bytes((directory / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((directory / "model.safetensors").read_bytes()[8 : 8 + header_len])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"F16"}
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (directory / name).is_file(), name


def test_model_card_reports_per_layer_loss_and_completions():
    card = (require_bundled() / "README.md").read_text()
    assert "exit after layer" in card and "tokens seen" in card and "wall time" in card
    greedy, healed = card.split("## Greedy completions")[1].split("## Quality on held-out")
    assert greedy.count("```python") == 3  # the export's own samples
    assert healed.count("```python") == 3 and "next-line exact match" in healed
