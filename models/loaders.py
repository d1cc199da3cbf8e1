"""Load what users bring: a local Hugging Face directory, a llama2.c checkpoint, or the
bundled default model — as a `transformers` model plus a `tokenizers.Tokenizer`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from leapc.ir.errors import InputError, UnsupportedModelError

# A block-diffusion checkpoint's config names its decoding contract under this key
# (``block_size``, ``mask_token_id``, ``logits_shift``; models/train_diffusion.py).
DIFFUSION_KEY = "leapc_block_diffusion"
BUNDLED = "bundled"
BUNDLED_DIR = Path(__file__).parent / "pycoder-15m"
BUNDLED_DRAFT = "bundled-draft"
BUNDLED_DRAFT_DIR = Path(__file__).parent / "pycoder-draft-2m"
BUNDLED_DIFFUSION = "bundled-diffusion"  # the bundled model adapted to block diffusion
BUNDLED_DIFFUSION_DIR = Path(__file__).parent / "pycoder-15m-diffusion"
_NAMED = {BUNDLED: BUNDLED_DIR, BUNDLED_DRAFT: BUNDLED_DRAFT_DIR,
          BUNDLED_DIFFUSION: BUNDLED_DIFFUSION_DIR}


@dataclass(frozen=True)
class SourceModel:
    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str  # "bundled" or the resolved path it was loaded from
    bos_id: int | None
    eos_ids: tuple[int, ...]
    # The Jinja template that turns chat messages into a prompt (a Hugging Face
    # directory's, if it has one): what `leapc serve` renders /v1/chat/completions with.
    chat_template: str | None = None

    @property
    def family(self) -> str:
        return self.model.config.get_text_config().model_type

    @property
    def block_diffusion(self) -> dict | None:
        """The block-diffusion contract its config records (`DIFFUSION_KEY`), if any."""
        return getattr(self.model.config, DIFFUSION_KEY, None)

    @property
    def trained_positions(self) -> int | None:
        """The positions the model was trained for, if its config says."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)


def weights_sha256(model: PreTrainedModel) -> str:
    """Identity of the weights: sha256 over every parameter and buffer, by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _special_ids(model: PreTrainedModel) -> tuple[int | None, tuple[int, ...]]:
    gen, cfg = model.generation_config, model.config
    bos = gen.bos_token_id if gen.bos_token_id is not None else cfg.bos_token_id
    eos = _token_ids(gen.eos_token_id) or _token_ids(cfg.eos_token_id)
    return (_token_ids(bos) or (None,))[0], eos


def _load_hf(directory: Path, tokenizer: Path | None) -> tuple[PreTrainedModel, Tokenizer]:
    tok_file = tokenizer or directory / "tokenizer.json"
    if not tok_file.is_file():
        raise InputError(f"{directory} has no tokenizer.json; pass --tokenizer PATH")
    tok = _read_tokenizer(tok_file)  # before the weights: a bad file fails fast
    hf_logging.disable_progress_bar()  # the CLI's stderr is one error line, or nothing
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except SafetensorError as err:  # a truncated or overwritten weights file
        raise InputError(f"{directory}: the weights file is corrupt or truncated "
                         f"({_first_line(err)})") from None
    except (ValueError, KeyError, OSError) as err:
        raise UnsupportedModelError(f"cannot load {directory} as a causal LM: "
                                    f"{_first_line(err)}") from None
    return model, tok


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exceptions for bad JSON or UTF-8
        raise InputError(f"{path} is not a valid tokenizer.json ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_source(spec: str | Path, tokenizer: Path | None = None) -> SourceModel:
    """``spec`` is ``"bundled"`` (or ``"bundled-draft"``), a Hugging Face directory, or a
    llama2.c ``.bin``."""
    path = _NAMED.get(str(spec), Path(spec))
    if not path.exists():
        raise InputError(f"model {spec} does not exist (a Hugging Face directory, a llama2.c "
                         f".bin, or '{BUNDLED}')")
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    if tokenizer is not None and not tokenizer.is_file():
        raise InputError(f"tokenizer {tokenizer} does not exist (--tokenizer takes a file)")
    if path.is_file() and path.suffix == ".bin":
        from leapc.models.llama2c import load_llama2c

        try:
            model, tok = load_llama2c(path, tokenizer)
        except ValueError as err:
            raise UnsupportedModelError(str(err)) from None
    elif path.is_dir():
        model, tok = _load_hf(path, tokenizer)
    else:
        raise InputError(f"model {spec} is neither a Hugging Face directory nor a llama2.c .bin")
    model.eval()
    bos, eos = _special_ids(model)
    name = str(spec) if str(spec) in _NAMED else str(path.resolve())
    return SourceModel(model, tok, name, bos, eos, _chat_template(path) if path.is_dir() else None)


def _chat_template(directory: Path) -> str | None:
    """The directory's chat template, where Hugging Face keeps it: ``chat_template.jinja``,
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates of
    which the ``default`` one)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config} is not valid JSON ({_first_line(err)})") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def save_first_layers(source: SourceModel, layers: int, out_dir: Path) -> Path:
    """Write a Hugging Face directory holding ``source``'s first ``layers`` decoder layers
    with its own final norm and LM head: a draft model for a target that has none (same
    vocabulary, shares the target's early computation but not its cache)."""
    import copy

    model = copy.deepcopy(source.model)
    total = model.config.num_hidden_layers
    if not 0 < layers < total:
        raise InputError(f"a draft of the first {layers} layers needs 0 < layers < {total}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    source.tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    return Path(out_dir)
