"""Train a tiny encoder-decoder Transformer to reverse sequences, once per attention backend.

    python examples/toy_reverse.py [--steps 200] [--device cuda]

The flash (ours) and naive backends start from the same weights and see the same
batches; their loss curves agree to float32 rounding. Without a GPU this runs on
CPU (set TRITON_INTERPRET=1 to push the flash backend through Triton's
interpreter; otherwise it takes flashattn_py's PyTorch path).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from flashattn_py.models import Seq2SeqTransformer, set_attention_backend

VOCAB, BOS, LENGTH = 16, 0, 8  # tokens 1..15, 0 starts the decoder input


def batches(steps: int, batch: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        src = torch.randint(1, VOCAB, (batch, LENGTH), generator=gen)
        tgt = src.flip(1)
        tgt_in = torch.cat([torch.full((batch, 1), BOS), tgt[:, :-1]], dim=1)  # teacher forcing
        yield src.to(device), tgt_in.to(device), tgt.to(device)


def train(backend: str, steps: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = set_attention_backend(Seq2SeqTransformer(VOCAB, d_model=32, n_heads=2, n_layers=2, d_ff=64), backend)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for src, tgt_in, tgt in batches(steps, 32, device):
        logits = model(src, tgt_in)  # (B, T, vocab)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    curves = {backend: train(backend, args.steps, device) for backend in ("flash", "naive")}
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"step {step:4d}  flash {curves['flash'][step]:.5f}  naive {curves['naive'][step]:.5f}")
    gap = max(abs(a - b) for a, b in zip(curves["flash"], curves["naive"], strict=True))
    print(f"final loss: flash {curves['flash'][-1]:.4f}, naive {curves['naive'][-1]:.4f}; "
          f"largest gap over {args.steps} steps: {gap:.2e}")


if __name__ == "__main__":
    main()
