"""Which sublayers a layer-skip draft bypasses, without torch (the manifest records it;
`leapc.passes.skip_layers` builds the program)."""

from __future__ import annotations

from dataclasses import dataclass

from leapc.ir.errors import InputError


@dataclass(frozen=True)
class SkipSet:
    """Layers whose attention, and layers whose MLP, the draft bypasses (output = input).

    Written as a comma-separated list: ``3`` is all of layer 3, ``a3`` its attention,
    ``m3`` its MLP (``"2,a5,m7"``).
    """

    attention: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str, num_layers: int, who: str = "--skip") -> SkipSet:
        attention, mlp = set(), set()
        for item in (part.strip() for part in text.split(",")):
            kind, number = (item[0], item[1:]) if item[:1] in ("a", "m") else ("", item)
            if not number.isdigit():
                raise InputError(f"{who}: {item!r} is not a layer (7), an attention (a7) or an "
                                 f"MLP (m7) sublayer; give a comma-separated list such as 2,a5,m7")
            layer = int(number)
            if kind != "m":
                attention.add(layer)
            if kind != "a":
                mlp.add(layer)
        return cls(frozenset(attention), frozenset(mlp)).checked(num_layers, who)

    def checked(self, num_layers: int, who: str) -> SkipSet:
        """``self``, if every layer exists and at least one attention sublayer is kept (a
        draft with no attention would ignore its context and its ``past`` input)."""
        outside = sorted(i for i in self.attention | self.mlp if not 0 <= i < num_layers)
        if outside:
            raise InputError(f"{who}: layer {outside[0]} is out of range for a {num_layers}-layer "
                             f"model (0 to {num_layers - 1})")
        if not self.keeps_attention(num_layers):
            raise InputError(f"{who}: a skip set must keep at least one attention sublayer")
        return self

    def adding(self, move: tuple[str, int]) -> SkipSet:
        """This set with one more sublayer, ``("attention" | "mlp", layer)``."""
        kind, layer = move
        if kind == "attention":
            return SkipSet(self.attention | {layer}, self.mlp)
        return SkipSet(self.attention, self.mlp | {layer})

    def keeps_attention(self, num_layers: int) -> bool:
        return len(self.attention) < num_layers

    @property
    def size(self) -> int:
        """Sublayers skipped."""
        return len(self.attention) + len(self.mlp)

    def __str__(self) -> str:
        items = []
        for layer in sorted(self.attention | self.mlp):
            both = layer in self.attention and layer in self.mlp
            items.append(str(layer) if both else ("a" if layer in self.attention else "m")
                         + str(layer))
        return ",".join(items)
