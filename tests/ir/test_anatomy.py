"""The anatomy finds every landmark of each family's captured graph, with the right values."""

from __future__ import annotations

import pytest
import torch
from families import captured, tiny_model
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from leapc.ir.anatomy import is_attention, recover_anatomy
from leapc.ir.capture import CaptureOptions, export_step
from leapc.ir.dims import ModelDims
from leapc.ir.errors import UnsupportedModelError
from leapc.ir.graph import ancestors

NEW, PAST = 5, 3


@pytest.fixture(scope="module")
def cap(family):
    return captured(family)


@pytest.fixture(scope="module")
def anatomy(cap):
    return recover_anatomy(cap.program, cap.dims.num_layers, cap.dims.hidden_size)


def _nodes(program: ExportedProgram) -> dict:
    return {n.name: n for n in program.graph.nodes}


def _run_recording(program: ExportedProgram, inputs, names) -> tuple[dict, tuple]:
    """Run the lifted graph with an fx interpreter, keeping the values of ``names``."""
    args, user = [], iter(inputs)
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            args.append(next(user))
        elif spec.target in program.state_dict:
            args.append(program.state_dict[spec.target])
        else:
            args.append(program.constants[spec.target])
    recorded = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in names:
                recorded[n.name] = value
            return value

    with torch.no_grad():
        outputs = Recorder(program.graph_module).run(*args)
    return recorded, tuple(outputs)


def _step_inputs(dims: ModelDims, seed: int = 0):
    """NEW prompt tokens behind PAST invalid slots (so HF can run the same tokens cache-free)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, dims.vocab_size, (2, NEW), generator=g)
    positions = torch.arange(NEW).expand(2, NEW).contiguous()
    past = torch.randn(dims.num_layers, 2, 2, dims.num_kv_heads, PAST, dims.head_dim,
                       generator=g)
    mask = torch.cat([torch.zeros(NEW, PAST, dtype=torch.bool),
                      torch.ones(NEW, NEW, dtype=torch.bool).tril()], dim=-1)
    return tokens, positions, past, mask.expand(2, NEW, PAST + NEW).contiguous()


def test_layers_and_residual_chain(cap, anatomy):
    assert len(anatomy.layers) == cap.dims.num_layers
    assert [la.index for la in anatomy.layers] == list(range(cap.dims.num_layers))
    prefix = anatomy.layers[0].module.rsplit(".", 1)[0]
    assert [la.module for la in anatomy.layers] == [f"{prefix}.{i}" for i in range(2)]
    for before, after in zip(anatomy.layers, anatomy.layers[1:], strict=False):
        assert after.residual_in == before.residual_out
    nodes = _nodes(cap.program)
    embedding = nodes[anatomy.embedding]
    assert embedding.target == torch.ops.aten.embedding.default
    first_in = nodes[anatomy.layers[0].residual_in]
    assert first_in is embedding or embedding in ancestors(first_in)
    assert nodes[anatomy.final_norm] in ancestors(nodes[anatomy.lm_head])
    assert nodes[anatomy.layers[-1].residual_out] in ancestors(nodes[anatomy.final_norm])
    assert anatomy.describe()[0] == ("embedding", anatomy.embedding)


def test_attention_and_kv_nodes(cap, anatomy):
    nodes = _nodes(cap.program)
    for layer in anatomy.layers:
        assert layer.attention, layer
        for name in layer.attention:
            assert is_attention(nodes[name])
        attention = nodes[layer.attention[0]]
        keys, values = nodes[layer.keys], nodes[layer.values]
        assert keys.target == values.target == torch.ops.aten.cat.default
        assert keys in ancestors(attention.args[1]) | {attention.args[1]}
        assert values in ancestors(attention.args[2]) | {attention.args[2]}


def test_lm_head_weight_is_a_program_parameter(cap, anatomy):
    params = dict(cap.program.named_parameters())
    weight = params[anatomy.lm_head_weight]
    assert weight.shape == (cap.dims.vocab_size, cap.dims.hidden_size)
    lm_head = _nodes(cap.program)[anatomy.lm_head]
    placeholder = {v: k for k, v in cap.program.graph_signature.inputs_to_parameters.items()}
    assert placeholder[anatomy.lm_head_weight] in [a.name for a in lm_head.all_input_nodes]


def test_landmark_values(family, cap, anatomy):
    """Residuals equal HF's hidden states, the LM head reproduces logits, KV nodes the present."""
    inputs = _step_inputs(cap.dims)
    layers = anatomy.layers
    names = {anatomy.final_norm, anatomy.embedding, *(la.residual_in for la in layers),
             *(la.keys for la in layers), *(la.values for la in layers)}
    values, (logits, present) = _run_recording(cap.program, inputs, names)

    assert anatomy.lm_head_bias is None  # no supported family has an LM head bias
    weight = dict(cap.program.named_parameters())[anatomy.lm_head_weight]
    torch.testing.assert_close(torch.nn.functional.linear(values[anatomy.final_norm], weight),
                               logits)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(values[layer.keys][..., PAST:, :], present[i, 0])
        torch.testing.assert_close(values[layer.values][..., PAST:, :], present[i, 1])
        torch.testing.assert_close(values[layer.keys][..., :PAST, :], inputs[2][i, 0])

    model = tiny_model(family)
    with torch.no_grad():
        hf = model(input_ids=inputs[0], output_hidden_states=True)
    torch.testing.assert_close(logits, hf.logits)
    # hidden_states[i] enters layer i; the last one is the final norm's output.
    for i, layer in enumerate(layers):
        torch.testing.assert_close(values[layer.residual_in], hf.hidden_states[i])
    torch.testing.assert_close(values[anatomy.final_norm], hf.hidden_states[-1])
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(values[anatomy.embedding], embed[inputs[0]])


# ------------------------------------------------------------- graphs without the structure

DIMS = ModelDims(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=256,
                 dtype="float32")
OPTIONS = CaptureOptions(max_seq=32, max_batch=2, max_new=8)


class _ToyLayer(torch.nn.Module):
    def __init__(self, kv: bool):
        super().__init__()
        self.proj = torch.nn.Linear(DIMS.hidden_size, 3 * DIMS.hidden_size)
        self.kv = kv

    def forward(self, h, past, mask):
        b, n, _ = h.shape
        q, k, v = (x.view(b, n, 4, 16).transpose(1, 2)
                   for x in self.proj(h).split(DIMS.hidden_size, dim=-1))
        k, v = k[:, :2], v[:, :2]
        present = torch.stack([k, v])
        if self.kv:  # attend to past + new, like a cache update
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
            attn_mask = mask[:, None]
        else:  # new tokens only: no KV update in the graph
            attn_mask = mask[:, None, :, -n:]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                               enable_gqa=True)
        return h + out.transpose(1, 2).reshape(b, n, DIMS.hidden_size), present


class _Toy(torch.nn.Module):
    """The step signature with some of the structure missing."""

    def __init__(self, embed: bool = True, layers: bool = False, kv: bool = False,
                 head_bias: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(DIMS.vocab_size, DIMS.hidden_size)
        self.use_embedding = embed
        self.layers = torch.nn.ModuleList(_ToyLayer(kv) for _ in range(2 if layers else 0))
        self.head = torch.nn.Linear(DIMS.hidden_size, DIMS.vocab_size, bias=head_bias)

    def forward(self, tokens, positions, past, mask):
        if self.use_embedding:
            h = self.embed(tokens)
        else:
            one_hot = torch.nn.functional.one_hot(tokens, DIMS.vocab_size).to(past.dtype)
            h = one_hot @ self.embed.weight
        presents = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, past[i], mask)
            presents.append(kv)
        b, n = tokens.shape
        present = torch.stack(presents) if presents else past.new_zeros(2, 2, b, 2, n, 16)
        return self.head(h), present


@pytest.mark.parametrize(("toy", "missing"), [
    (_Toy(), "decoder layers"),
    (_Toy(layers=True, kv=False), "key and a value cache update"),
    (_Toy(embed=False, layers=True, kv=True), "token embedding"),
])
def test_graph_without_structure_is_refused(toy, missing):
    program = export_step(toy.eval(), DIMS, OPTIONS)
    with pytest.raises(UnsupportedModelError, match=missing):
        recover_anatomy(program, DIMS.num_layers, DIMS.hidden_size)


@pytest.mark.parametrize("head_bias", [False, True])
def test_toy_with_structure_is_recovered(head_bias):
    """The same toy with an embedding, layers and KV updates does yield an anatomy."""
    toy = _Toy(layers=True, kv=True, head_bias=head_bias).eval()
    program = export_step(toy, DIMS, OPTIONS)
    anatomy = recover_anatomy(program, DIMS.num_layers, DIMS.hidden_size)
    assert [la.module for la in anatomy.layers] == ["layers.0", "layers.1"]
    assert anatomy.lm_head_weight == "head.weight"
    assert anatomy.lm_head_bias == ("head.bias" if head_bias else None)
    inputs = _step_inputs(DIMS)
    values, (logits, present) = _run_recording(program, inputs, {anatomy.final_norm})
    params = dict(program.named_parameters())
    bias = params[anatomy.lm_head_bias] if head_bias else None
    torch.testing.assert_close(
        torch.nn.functional.linear(values[anatomy.final_norm], params["head.weight"], bias),
        logits)


def test_wrong_layer_count_is_refused(cap):
    with pytest.raises(UnsupportedModelError, match="3 decoder layers"):
        recover_anatomy(cap.program, 3, cap.dims.hidden_size)
