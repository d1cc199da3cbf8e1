"""Decoding heads (Medusa, Hydra): extra next-next-token predictors over the last hidden state.

A model's LM head maps the final-norm hidden state ``h_t`` to the distribution of token
``t + 1``. Head ``k`` (k = 1..K) maps the same ``h_t`` to token ``t + 1 + k``:

    z_k = h_t (+ U_k e(x_{t+k}) for Hydra)       U_k: [H, H], e: the token embedding
    z_k <- z_k + SiLU(W_kb z_k + b_kb)           for each of the head's residual blocks b
    head_logits_k = lm_head(z_k)                 the model's own LM head (shared, frozen)

Medusa heads read ``h_t`` alone, so one hidden state yields every depth of a draft at
once. Hydra heads are sequentially dependent: head k also reads the token drafted at
depth k - 1 (depth 0 is the root, the token the LM head chose), so a draft grows one depth
per call. With zero-initialised blocks (and U) every head reproduces the LM head, which is
where training starts. Sharing the LM head keeps a head at H*H*(blocks + Hydra's U)
weights, so trained heads ship in kilobytes, not a vocabulary matrix each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leapc.ir.head_spec import HeadKind, HeadsConfig
from leapc.ir.vocabulary import spread


class DecodingHeads(nn.Module):
    """The K heads' trainable weights, stacked so all heads run as batched matmuls."""

    def __init__(self, config: HeadsConfig, hidden_size: int):
        super().__init__()
        k, blocks, h = config.num_heads, config.num_blocks, hidden_size
        self.config = config
        self.weight = nn.Parameter(torch.zeros(k, blocks, h, h))
        self.bias = nn.Parameter(torch.zeros(k, blocks, h))
        if config.kind is HeadKind.HYDRA:
            self.token_proj = nn.Parameter(torch.zeros(k, h, h))

    @property
    def is_hydra(self) -> bool:
        return self.config.kind is HeadKind.HYDRA

    def states(self, hidden: torch.Tensor,
               token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """``[K, M, H]`` head states, head k at index k - 1.

        ``hidden`` is ``[M, H]`` (or ``[K, M, H]``: one row set per head, as in training);
        Hydra's ``token_embeddings`` are ``[K, M, H]``: for head k, the embedding of the
        token at depth k - 1 of the draft that row extends.

        Heads run one after the other as 2-D matmuls on constant weight slices: exported,
        each is a plain MatMul whose weight ONNX Runtime packs once, where a batched matmul
        over stacked weights repacked them every call (measured 0.34 of 0.56 ms a call).
        """
        k = self.weight.shape[0]
        rows = [hidden[i] if hidden.ndim == 3 else hidden for i in range(k)]
        return torch.stack([self._state(i, rows[i], None if token_embeddings is None
                                        else token_embeddings[i]) for i in range(k)])

    def _state(self, k: int, z: torch.Tensor, token_embedding: torch.Tensor | None):
        if self.is_hydra:
            z = z + F.linear(token_embedding, self.token_proj[k])
        for b in range(self.weight.shape[1]):
            z = z + F.silu(F.linear(z, self.weight[k, b], self.bias[k, b]))
        return z


def project(states: torch.Tensor, lm_weight: torch.Tensor,
            lm_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The shared LM head over head states: ``[S, M, H] -> [S, M, V]``."""
    return F.linear(states, lm_weight, lm_bias)


class _DraftProjection(nn.Module):
    """The LM head a heads program drafts with: onto every token, or onto ``vocabulary``
    only (`--draft-vocab`), spread back to ``V`` columns (`leapc.ir.vocabulary`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 vocabulary: tuple[int, ...]):
        super().__init__()
        self.vocab_size = weight.shape[0]
        ids = torch.tensor(vocabulary, dtype=torch.int64) if vocabulary else None
        rows = slice(None) if ids is None else ids
        self.register_buffer("ids", ids)
        self.register_buffer("weight", weight.detach()[rows].clone())
        self.register_buffer("bias", None if bias is None else bias.detach()[rows].clone())

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        logits = project(states, self.weight, self.bias)
        return logits if self.ids is None else spread(logits, self.ids, self.vocab_size)


class MedusaProgram(nn.Module):
    """The ``heads`` program of a Medusa engine: ``hidden [N, H] -> head_logits [K, N, V]``
    (outputs are a tuple, as every program's are)."""

    def __init__(self, heads: DecodingHeads, lm_weight: torch.Tensor,
                 lm_bias: torch.Tensor | None, vocabulary: tuple[int, ...] = ()):
        super().__init__()
        self.heads = heads
        self.head = _DraftProjection(lm_weight, lm_bias, vocabulary)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.head(self.heads.states(hidden)),)


class HydraProgram(nn.Module):
    """The ``heads`` program of a Hydra engine, one depth per call:
    ``hidden [N, H], tokens [N], head [1] -> head_logits [1, N, V]`` (head index 0-based:
    head ``k + 1`` predicts depth ``k + 1`` from the token at depth ``k``)."""

    def __init__(self, heads: DecodingHeads, lm_weight: torch.Tensor,
                 lm_bias: torch.Tensor | None, embedding: torch.Tensor,
                 vocabulary: tuple[int, ...] = ()):
        super().__init__()
        self.heads = heads
        self.head = _DraftProjection(lm_weight, lm_bias, vocabulary)
        self.register_buffer("embedding", embedding.detach().clone())

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor,
                head: torch.Tensor) -> tuple[torch.Tensor]:
        # Every head's state, then the one asked for: selecting weights by a run-time index
        # would copy them (and transpose them) on every call, while the K head states cost
        # K*H*H per row, far less than the one vocabulary projection that follows.
        k = self.heads.config.num_heads
        embedded = F.embedding(tokens, self.embedding).expand(k, -1, -1)
        states = self.heads.states(hidden, embedded).index_select(0, head)
        return (self.head(states),)


def heads_signature(config: HeadsConfig, dims, max_rows: int, max_seq: int):
    """Inputs and outputs of the ``heads`` program; ``N`` counts the rows (draft nodes)."""
    from leapc.ir import signature as sig

    n, hidden = sig.N, sig.TensorSpec("hidden", dims.dtype, (sig.N, dims.hidden_size))
    if config.kind is HeadKind.HYDRA:
        inputs = (hidden, sig.TensorSpec("tokens", "int64", (n,)),
                  sig.TensorSpec("head", "int64", (1,)))
        out_heads = 1
    else:
        inputs, out_heads = (hidden,), config.num_heads
    outputs = (sig.TensorSpec("head_logits", dims.dtype, (out_heads, n, dims.vocab_size)),)
    return sig.StepSignature(inputs, outputs, {"N": (1, max_rows)}, max_seq)


def capture_heads(heads: DecodingHeads, model, max_rows: int, max_seq: int,
                  vocabulary: tuple[int, ...] = ()):
    """Export the ``heads`` program of ``model`` (a transformers causal LM) with its own
    LM head (and, for Hydra, its input embedding), rows dynamic up to ``max_rows``; onto
    ``vocabulary`` only, if given (`--draft-vocab`)."""
    from torch.export import Dim

    from leapc.ir.capture import CapturedProgram
    from leapc.ir.dims import ModelDims

    dims = ModelDims.of(model)
    out = model.get_output_embeddings()
    rows = Dim("N", min=1, max=max_rows)
    hidden = torch.randn(3, dims.hidden_size, dtype=getattr(torch, dims.dtype))
    if heads.is_hydra:
        module = HydraProgram(heads, out.weight, out.bias, model.get_input_embeddings().weight,
                              vocabulary)
        args = (hidden, torch.zeros(3, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
        shapes = {"hidden": {0: rows}, "tokens": {0: rows}, "head": None}
    else:
        module, args, shapes = MedusaProgram(heads, out.weight, out.bias, vocabulary), (hidden,), {
            "hidden": {0: rows}}
    with torch.no_grad():
        program = torch.export.export(module.eval(), args, dynamic_shapes=shapes, strict=False)
    return CapturedProgram(program, heads_signature(heads.config, dims, max_rows, max_seq), dims)
