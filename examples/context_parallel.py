"""Train the reference GPT context-parallel: each rank holds a shard of every sequence (ring attention).

    torchrun --nproc-per-node 2 examples/context_parallel.py     # gloo on CPU, nccl on GPUs
    python examples/context_parallel.py                          # spawns 2 CPU processes itself
    python examples/context_parallel.py --world 3 --seq-len 301 --layout contiguous

Every rank gets its shard of the tokens (``shard_sequence``, zigzag layout by
default), attention runs as ``ring_attention`` over the group, the loss is the
sum over local tokens divided by the global token count, and the parameter
gradients are summed over the group after ``backward()``. Rank 0 also trains a
single-process replica on the whole sequences from the same weights and prints
both losses and the largest gradient difference at every step: they agree to
fp32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flashattn_py.distributed import all_reduce_gradients, context_parallel, shard_lengths, shard_sequence  # noqa: E402
from flashattn_py.models import GPT  # noqa: E402


def batch(gen: torch.Generator, batch_size: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Toy language: each sequence counts up from a random start with a random stride (mod vocab)."""
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    return (start + stride * torch.arange(seq_len + 1)) % vocab  # (B, T + 1): inputs and next-token targets


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.cpu
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    group = dist.group.WORLD

    torch.manual_seed(0)  # the same initial weights on every rank
    base = GPT(args.vocab, d_model=64, n_heads=4, n_layers=2, max_len=args.seq_len).to(device)
    model = context_parallel(copy.deepcopy(base), group, layout=args.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    replica = copy.deepcopy(base) if rank == 0 else None
    opt_replica = torch.optim.AdamW(replica.parameters(), lr=3e-3) if replica is not None else None

    gen = torch.Generator().manual_seed(1)  # the same batches on every rank
    if rank == 0:
        lengths = shard_lengths(args.seq_len, world, args.layout)
        print(f"{world} ranks ({'nccl' if use_cuda else 'gloo'}), layout {args.layout}, sequences of "
              f"{args.seq_len} tokens, {lengths} per rank")
        print(f"{'step':>4} {'loss (context parallel)':>24} {'loss (one process)':>19} {'max |grad diff|':>16}")
    for step in range(args.steps):
        tokens = batch(gen, args.batch, args.seq_len, args.vocab).to(device)
        idx, tgt = tokens[:, :-1], tokens[:, 1:]
        idx_local = shard_sequence(idx, rank, world, args.layout, dim=1)
        tgt_local = shard_sequence(tgt, rank, world, args.layout, dim=1)
        logits = model(idx_local)  # (B, S_local, vocab)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tgt_local.reshape(-1), reduction="sum") / tgt.numel()
        opt.zero_grad()
        loss.backward()
        all_reduce_gradients(model, group)  # each rank held its tokens' share of every gradient
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        opt.step()
        if replica is not None:
            ref = F.cross_entropy(replica(idx).reshape(-1, args.vocab), tgt.reshape(-1))
            opt_replica.zero_grad()
            ref.backward()
            diff = max((a.grad - b.grad).abs().max().item()
                       for a, b in zip(model.parameters(), replica.parameters(), strict=True))
            opt_replica.step()
            if step % args.log_every == 0 or step == args.steps - 1:
                print(f"{step:4d} {total.item():24.6f} {ref.item():19.6f} {diff:16.2e}", flush=True)
    dist.destroy_process_group()


def _spawned(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(rank, world, args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="processes to spawn without torchrun (default 2)")
    parser.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    parser.add_argument("--seq-len", type=int, default=250, help="tokens per sequence (any length; default 250)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even where GPUs are present")
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:
        mp.spawn(_spawned, args=(args.world, args, _free_port()), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
