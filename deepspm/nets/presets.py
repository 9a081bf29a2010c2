"""Network presets: the layer plan of the VGG-like probe CNN, as plain frozen data.

`paper` follows the paper's Methods text, `original` the released DeepSPM code (reference section 4.1);
`compact` is ours, sized for batch-1 inference on a CPU; `tiny` exists only for fast tests. A preset is
hashable and JSON-round-trippable so that a checkpoint can name and describe its own architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMAGE_SIDE_PX = 64  # every net sees one 64x64 single-channel image


@dataclass(frozen=True)
class NetSpec:
    """The layer plan of one CNN.

    conv_sets: output maps of each 3x3 conv, grouped in sets (each conv: no bias -> BN -> ReLU).
    pool_after: a 2x2/2 max-pool after set i when `pool_after[i]` is true.
    global_pool: average over space before the FC layers instead of flattening (keeps the first FC small).
    hidden: widths of the hidden FC layers (each: no bias -> BN -> ReLU -> dropout).
    """

    name: str
    conv_sets: tuple[tuple[int, ...], ...]
    pool_after: tuple[bool, ...]
    hidden: tuple[int, ...]
    global_pool: bool = False
    dropout_rate: float = 0.5
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3
    image_side_px: int = IMAGE_SIDE_PX

    def __post_init__(self) -> None:
        if len(self.pool_after) != len(self.conv_sets):
            raise ValueError(f"{self.name}: pool_after needs one flag per conv set")
        if any(len(s) == 0 for s in self.conv_sets) or not self.conv_sets:
            raise ValueError(f"{self.name}: every conv set needs at least one layer")
        side = self.image_side_px
        for pooled in self.pool_after:
            if pooled:
                if side % 2:
                    raise ValueError(f"{self.name}: cannot pool an odd side of {side} px")
                side //= 2

    def conv_shapes(self) -> list[tuple[int, int, int]]:
        """(side px, input maps, output maps) of every 3x3 conv, in order."""
        shapes, side, maps = [], self.image_side_px, 1
        for conv_set, pooled in zip(self.conv_sets, self.pool_after):
            for out_maps in conv_set:
                shapes.append((side, maps, out_maps))
                maps = out_maps
            if pooled:
                side //= 2
        return shapes

    @property
    def final_side_px(self) -> int:
        """Spatial side of the last conv set's output (before flattening or global pooling)."""
        return self.image_side_px // 2 ** sum(self.pool_after)

    @property
    def flat_features(self) -> int:
        """Width of the vector entering the first FC layer."""
        maps = self.conv_sets[-1][-1]
        return maps if self.global_pool else maps * self.final_side_px**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetSpec:
        fields = dict(data)
        fields["conv_sets"] = tuple(tuple(int(m) for m in s) for s in fields["conv_sets"])
        fields["pool_after"] = tuple(bool(p) for p in fields["pool_after"])
        fields["hidden"] = tuple(int(h) for h in fields["hidden"])
        return cls(**fields)


_VGG_SETS = ((64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512))

PRESETS: dict[str, NetSpec] = {
    spec.name: spec
    for spec in (
        # ~561.49 M trainable parameters with a 1-logit head; the first FC holds 96 % of them.
        NetSpec("paper", _VGG_SETS, (True, True, False, False), (4096, 4096)),
        # ~42.43 M trainable parameters with a 1-logit head.
        NetSpec("original", _VGG_SETS, (True, True, True, False), (1024, 1024)),
        # CPU-sized (~0.40 M): thin sets at high resolution, pooling after every set, 4x4x64 flattened;
        # ~1 ms at batch 1 on one CPU core versus ~0.2 s for `paper`.
        NetSpec("compact", ((8,), (16, 16), (32, 32), (64, 64)), (True, True, True, True), (256, 256)),
        # compact with every conv set twice as wide (~0.88 M; ~4x the conv arithmetic, ~2x compact's training
        # time): the members of the H:Si(100) recipe, measured better out of fold (docs/training.md).
        NetSpec("wide", ((16,), (32, 32), (64, 64), (128, 128)), (True, True, True, True), (256, 256)),
        # For tests only: a few thousand parameters, compiles in well under a second.
        NetSpec("tiny", ((4,), (8,)), (True, True), (16,), global_pool=True),
    )
}


def get_preset(name: str) -> NetSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
