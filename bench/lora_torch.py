"""PyTorch's side of the LoRA benchmarks (decoder.py, train_minilm.py): adapters written out as
kiln's (src/nn/lora.rs), which is what PEFT's LoraLayer computes, without depending on PEFT."""

from __future__ import annotations

import math

DECODER_ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def add_lora(torch, model, modules: list[str], rank: int, alpha: float, dropout: float) -> int:
    """Freezes every weight and wraps each nn.Linear named in `modules` (q_proj, v_proj, query,
    value, ...; all-linear: every projection of a decoder's layers) with a LoRA adapter:
    y = W x + b + alpha/rank * B(A dropout(x)), A: [rank, in] uniform +-1/sqrt(in), B: [out, rank]
    zeros. Returns how many linears were wrapped."""
    nn = torch.nn
    wanted = DECODER_ALL_LINEAR if "all-linear" in modules else set(modules)

    class LoraLinear(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
            bound = 1.0 / math.sqrt(base.in_features)
            nn.init.uniform_(self.lora_A.weight, -bound, bound)
            nn.init.zeros_(self.lora_B.weight)
            self.scale = alpha / rank
            self.drop = nn.Dropout(dropout)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale

    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(parent, name) for _, parent in model.named_modules() for name, child in parent.named_children()
               if name in wanted and isinstance(child, nn.Linear)]
    for parent, name in targets:
        setattr(parent, name, LoraLinear(getattr(parent, name)))
    if not targets:
        raise SystemExit(f"LoRA: no nn.Linear named {sorted(wanted)} in the model")
    return len(targets)
