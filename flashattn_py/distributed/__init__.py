"""Context parallelism: exact ring attention over ``torch.distributed``.

A long sequence is split along its length over the ranks of a process group; each
rank holds a shard ``(B, H, S_local, D)`` of q, k and v. `ring_attention` computes
exactly the attention of the whole sequence, each rank getting the rows of its own
queries, by passing the K/V shards around the ring of ranks:

* **Forward.** At step ``t`` rank ``r`` holds the K/V shard of rank ``(r - t) mod P``
  and already sends it on to ``r + 1`` (``batch_isend_irecv``) while it computes
  ``attention(q_local, visiting K/V, return_lse=True)`` on the blocks that the
  causal mask / window let it see. The partial outputs merge exactly by their
  log-sum-exp, in fp32 (``O = Σ_t exp(lse_t - L) O_t``, ``L = logsumexp_t lse_t``;
  rows that have seen no key yet carry lse ``-inf`` and weight 0, never NaN).
* **Backward** (a custom ``torch.autograd.Function``, a second ring). K/V travel
  again, now with fp32 dK/dV accumulators; each rank adds the gradient of its own
  queries' attention to the visiting block and passes both on; after the last
  step the accumulators go home, so every rank ends with the gradients of its own
  K/V, and dQ accumulates locally. The accumulator of a block is summed in ring
  order starting at its owner, dQ in step order: the result is deterministic.
  The per-block gradient is the exact one of the whole attention: with the final
  ``L`` and ``Delta = rowsum(O · dO) - dL``, block ``(i, j)`` has
  ``P_ij = exp(S_ij - L_i)`` and ``dS_ij = P_ij (dO_i V_jᵀ - Delta_i)``. Two ways to
  compute it, both exact; the first whenever `global_lse_backward_available()`:

  - ``"global_lse"`` (default when available): the package's registered backward op
    ``flashattn_py::attn_bwd`` takes O, LSE and dLSE as inputs, so it is handed the
    *final* O and L: one backward kernel per block, no recomputation of the forward.
    This is FlashAttention's own backward, block by block.
  - ``"recompute"`` (fallback, public API only): re-run ``attention`` on the block
    under ``torch.enable_grad()`` (giving ``O_t``, ``lse_t``) and backpropagate
    ``dO_t = w dO`` and ``dlse_t = rowsum(O_t · dO_t) - w (Delta)`` with
    ``w = exp(lse_t - L)``: the block's own backward then uses
    ``P_t w = P`` and ``Delta_t' = w Delta``, i.e. the same ``dS``. It costs one extra
    forward per block (about 1.4x the backward's matmuls).

* **Skipping.** Each (query chunk, key chunk) pair is classified from global
  positions as empty, fully visible or banded; a step computes only the bounding
  boxes of what is visible (merged into as few `attention` calls as an exact band
  allows), never a computed-and-masked block. Ring steps that no rank needs (a
  window narrower than the ring) are not run at all: the ring stops early and
  the gradient accumulators are sent straight home.

Layouts (`shard_sequence`): ``"contiguous"`` gives rank r chunk r of P chunks;
``"zigzag"`` gives rank r chunks r and 2P-1-r of 2P chunks, which balances causal
work (every ring step then costs each rank half a block). Chunk c of n over a
sequence of S tokens has ``S // n + (c < S % n)`` tokens: lengths that are not a
multiple of n work, chunks differing by at most one token (shards too).

Backends: NCCL for CUDA tensors, gloo for CPU tensors (where `attention` runs its
PyTorch path, or the Triton interpreter under ``TRITON_INTERPRET=1``). The first
call of a signature (shapes, dtype, options, group, ...) makes one small
``all_gather`` of each rank's shapes and options, so a rank whose shard disagrees
(or whose inputs are invalid) raises a clear error on every rank instead of a hang;
the agreement is remembered per process group, and later calls of that signature
start the ring with no collective and no host read (`ring_attention` states the
contract). Waits on CPU tensors (gloo) take the ``timeout``; waits on CUDA tensors
(NCCL) are untimed, which keeps the host from blocking on them, and the process
group's own timeout (NCCL's watchdog) bounds them. All ranks must call
`ring_attention` (and its backward) in the same order, as with any collective.

The package, each module importing only from those before it:

* `_comm`: process groups, timeouts, waits, the small metadata ``all_gather``.
* `_layouts`: the sharding layouts (`shard_sequence`, `unshard_sequence`, `shard_lengths`, `shard_positions`).
* `_schedule`: the block schedule, which blocks each rank computes at each ring step.
* `_agreement`: validation and the shape agreement, remembered per process group.
* `_ring`: the ring forward and backward (a ``torch.autograd.Function``) and `ring_attention`.
* `_models`: the reference Transformer under context parallelism (`context_parallel`, `all_reduce_gradients`).
"""

# ``x as x``: re-exported beyond __all__ as before the split (the types, and what the tests and benchmarks use)
from ._agreement import _check_options as _check_options
from ._agreement import _check_tensors as _check_tensors
from ._comm import DEFAULT_TIMEOUT
from ._layouts import LAYOUTS, shard_lengths, shard_positions, shard_sequence, unshard_sequence
from ._layouts import Layout as Layout
from ._models import all_reduce_gradients, context_parallel
from ._ring import Causal as Causal
from ._ring import _backward_step as _backward_step
from ._ring import _delta as _delta
from ._ring import _forward_step as _forward_step
from ._ring import _ring_attention as _ring_attention
from ._ring import _use_global_lse as _use_global_lse
from ._ring import global_lse_backward_available as global_lse_backward_available
from ._ring import ring_attention
from ._schedule import _schedule as _schedule

__all__ = ["LAYOUTS", "DEFAULT_TIMEOUT", "ring_attention", "shard_sequence", "unshard_sequence", "shard_positions",
           "shard_lengths", "context_parallel", "all_reduce_gradients"]
