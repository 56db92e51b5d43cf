"""The contract every backend implements: what one attention call is, apart from its tensors.

The bottom layer of the package; it imports nothing of ours. Above it, the
Triton launch layer (`_launch`) and the PyTorch backend (`_torch_backend`)
both take these types; dispatch and the custom ops (`ops`) sit on top.

Adding a scalar option (a new score modifier, say) means one field here; the
custom-op boundary is generated from these fields (`op_scalar_fields`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import torch


class SeqMode(IntEnum):
    """How sequences sit in the q/k/v tensors (a kernel constexpr)."""

    DENSE = 0  # (B, H, S, D)
    PACKED = 1  # packed sequences: (1, H, total, D) views with cu_seqlens, bottom-right aligned per sequence
    KV_CACHE = 2  # dense queries over a KV cache with seqlens_k valid keys per sequence, bottom-right aligned


class BiasKind(IntEnum):
    """What the optional (B|1, H|1, Sq|1, Sk|1) bias tensor holds (a kernel constexpr)."""

    NONE = 0
    BOOL = 1  # True = takes part
    FLOAT = 2  # added to the scores


@dataclass(frozen=True)
class AttnSpec:
    """Everything about one attention call except its tensors.

    Query i sees key j iff i + offset - window_left <= j <= i + offset + window_right
    (-1 = no bound on that side; causal is window_right = 0). softcap > 0 applies
    c * tanh(s / c) to the scores. Dropout keeps each probability with chance
    1 - dropout_p, from a Philox stream keyed by `seed` (drawn per call inside the
    custom op, so it is not part of the op's arguments).
    """

    scale: float
    offset: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    bias_kind: BiasKind = BiasKind.NONE
    dropout_p: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SeqLayout:
    """How sequences sit in the q/k/v tensors (see `SeqMode`).

    PACKED: q/k/v are (1, H, total, D) views with cu_seqlens_q/k (int32, B + 1)
    and the longest lengths. KV_CACHE: seqlens_k (int32, B) valid keys per
    sequence, optionally paged through block_table (int32, B x pages).
    """

    mode: SeqMode = SeqMode.DENSE
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqlens_k: torch.Tensor | None = None
    block_table: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1


DENSE = SeqLayout()

# The custom ops carry the spec and the packed layout as flat scalars (torch.library needs flat arguments).
# They are generated from the dataclass fields, so a new field cannot be forgotten at one of the op signatures.
_NOT_ON_OP = {"seed", "mode"}  # the seed is drawn inside the op; the mode travels as `seq_mode`
_LAYOUT_SCALARS = ("mode", "max_seqlen_q", "max_seqlen_k")
_SCHEMA_TYPES = {"float": "float", "int": "SymInt", "BiasKind": "int", "SeqMode": "int"}


_SPEC_ON_OP = tuple((f.name, _SCHEMA_TYPES[f.type]) for f in dataclasses.fields(AttnSpec) if f.name not in _NOT_ON_OP)


def op_scalar_fields() -> list[tuple[str, str]]:
    """(name, schema type) of the scalars on the custom-op boundary: the spec's fields, then the layout's."""
    return [*_SPEC_ON_OP, ("seq_mode", "int"), ("max_seqlen_q", "SymInt"), ("max_seqlen_k", "SymInt")]


def to_op_scalars(spec: AttnSpec, seq: SeqLayout) -> tuple:
    """The flat scalars of `op_scalar_fields`, in order (traceable by torch.compile: no dataclass introspection)."""
    values = [getattr(spec, name) for name, _ in _SPEC_ON_OP] + [getattr(seq, name) for name in _LAYOUT_SCALARS]
    return tuple(int(v) if isinstance(v, IntEnum) else v for v in values)  # enums as plain ints for the schema


def from_op_scalars(scalars: tuple, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                    seed: int = 0) -> tuple[AttnSpec, SeqLayout]:
    """Inverse of `to_op_scalars` (plus the tensors and the seed the op carries separately)."""
    names = [name for name, _ in op_scalar_fields()]
    values = dict(zip(names, scalars, strict=True))
    mode = SeqMode(values.pop("seq_mode"))
    layout = {"max_seqlen_q": values.pop("max_seqlen_q"), "max_seqlen_k": values.pop("max_seqlen_k")}
    values["bias_kind"] = BiasKind(values["bias_kind"])
    spec = AttnSpec(**values, seed=seed)
    if mode == SeqMode.DENSE:
        return spec, DENSE
    return spec, SeqLayout(mode=mode, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **layout)
