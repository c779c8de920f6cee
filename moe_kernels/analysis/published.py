"""Published latency figures to show beside ours, each with its source and settings.

Never mixed with our numbers unlabelled: every row carries `source` (repository and
commit or README section) and `settings` (chip, shapes, scope). Sources:
shared/notes/anchor-figures.md and the spec's §6 table (hw-native-sys/pypto-lib history).
`DEEPEP_ASCEND_LL` is owned here; the communication model (`comm`) is validated against it
and fits only its per-call overhead on the EP8 row (see `comm`'s docstring).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Kinds of published figure (what they measure).
KINDS: tuple[str, ...] = ("communication", "stage", "step")

DEEPEP_ASCEND_SOURCE = "sgl-project/sgl-kernel-npu README, DeepEP-Ascend Performance"
DEEPEP_ASCEND_SETTINGS = ("low-latency, A3 384 SuperPOD, pure HCCS, 128 tokens, hidden 7168, "
                          "top-8, INT8 dispatch / BF16 combine")
PYPTO_LIB = "hw-native-sys/pypto-lib"

#: DeepEP-Ascend low-latency kernels (sgl-project/sgl-kernel-npu README, "DeepEP-Ascend
#: Performance"): pure HCCS, A3 384 SuperPOD, 128 tokens, hidden 7168, top-8, INT8
#: dispatch, BF16 combine. EP -> (dispatch us, dispatch GB/s, combine us, combine GB/s).
#: The GB/s columns are the publication's bytes / latency, not a link property.
DEEPEP_ASCEND_LL: dict[int, tuple[float, float, float, float]] = {
    8: (132.0, 58.0, 126.0, 116.0),
    16: (139.0, 55.0, 135.0, 109.0),
    32: (153.0, 49.0, 151.0, 97.0),
}
#: The shape of those measurements: tokens per rank, hidden size, top-k.
DEEPEP_ASCEND_LL_SHAPE: tuple[int, int, int] = (128, 7168, 8)


@dataclass(frozen=True)
class PublishedFigure:
    """One published latency: what (quantity), how long (us), where from and how set."""

    quantity: str      # e.g. "dispatch (EP8)", "gate", "single-card MoE step"
    value_us: float
    kind: str          # one of KINDS
    source: str        # repository + commit / README section
    settings: str      # chip, shapes, scope as the source states them

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not self.source.strip() or not self.settings.strip():
            raise ValueError(f"published figure {self.quantity!r} needs a source and settings")
        if not self.value_us > 0:
            raise ValueError(f"value_us must be > 0, got {self.value_us!r}")

    @property
    def label(self) -> str:
        """'published (source): quantity, settings' for legends and tables."""
        return f"published ({self.source}): {self.quantity}; {self.settings}"


def _deepep_rows() -> list[PublishedFigure]:
    rows = []
    for ep, (disp_us, _dgb, comb_us, _cgb) in sorted(DEEPEP_ASCEND_LL.items()):
        rows.append(PublishedFigure(f"DeepEP-Ascend dispatch (EP{ep})", disp_us,
                                    "communication", DEEPEP_ASCEND_SOURCE,
                                    DEEPEP_ASCEND_SETTINGS))
        rows.append(PublishedFigure(f"DeepEP-Ascend combine (EP{ep})", comb_us,
                                    "communication", DEEPEP_ASCEND_SOURCE,
                                    DEEPEP_ASCEND_SETTINGS))
    return rows


def published_figures(kinds: Sequence[str] | None = None) -> list[PublishedFigure]:
    """The published figures (optionally only some kinds), communication first."""
    if kinds is not None:
        bad = sorted(set(kinds) - set(KINDS))
        if bad:
            raise ValueError(f"kinds must be a subset of {list(KINDS)}, got {bad}")
    rows = _deepep_rows() + [
        PublishedFigure("gate (balanced EP2)", 40.0, "stage", f"{PYPTO_LIB} b8b84496 (#784)",
                        "gate window before the change, balanced EP2"),
        PublishedFigure("gate (balanced EP2), tuned", 33.0, "stage",
                        f"{PYPTO_LIB} b8b84496 (#784)", "gate window after the change, "
                        "balanced EP2"),
        PublishedFigure("expert_routed per task", 26.25, "stage",
                        f"{PYPTO_LIB} e4ce7a8a (#719)", "a2a3 (910B), one expert_routed task"),
        PublishedFigure("hc_post", 8.24, "stage", f"{PYPTO_LIB} fdec622f (#732)",
                        "a2a3, decode_layer rank 1"),
        PublishedFigure("EP8 core time per rank", 281.0, "step",
                        f"{PYPTO_LIB} b1daab68 (#975)", "a2a3, EP8, 8 ranks, MoE decode"),
        PublishedFigure("single-card MoE step (FLASH)", 1028.0, "step",
                        f"{PYPTO_LIB} 1597f5c8 (#473)", "a2a3, decode MoE step span, "
                        "FLASH preset, one card"),
    ]
    return [r for r in rows if kinds is None or r.kind in kinds]


def format_published(rows: Sequence[PublishedFigure]) -> str:
    """A plain-text table: quantity, us, source, settings."""
    lines = [f"{'quantity':<36}{'us':>9}  source  |  settings"]
    lines += [f"{r.quantity:<36}{r.value_us:>9.2f}  {r.source}  |  {r.settings}" for r in rows]
    return "\n".join(lines)
