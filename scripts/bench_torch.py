"""PyTorch counterpart of examples/bench_step.rs: same model, shapes, head, loss and optimizer.

Usage: python3 scripts/bench_torch.py MODEL_DIR [--threads N]
Prints ms/step and examples/s, to compare with kiln on the same machine in the same run.
"""
import sys
import time

import torch
from transformers import AutoModel

args = sys.argv[1:]
model_dir = [a for a in args if not a.startswith("--")][0]
threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 2
torch.set_num_threads(threads)
batch, seq, steps, warmup = 16, 20, 20, 3

model = AutoModel.from_pretrained(model_dir)
model.train()
head = torch.nn.Linear(model.config.hidden_size, 4)
no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
opt = torch.optim.AdamW(
    [
        {"params": decay, "lr": 2e-5, "weight_decay": 0.01},
        {"params": no_decay, "lr": 2e-5, "weight_decay": 0.0},
        {"params": head.parameters(), "lr": 1e-3, "weight_decay": 0.01},
    ],
    foreach=True,
)
vocab = model.config.vocab_size
ids = torch.tensor(
    [1000 + (i * 2654435761 % 2**32) % (vocab - 1000) for i in range(batch * seq)]
).reshape(batch, seq)
mask = torch.ones(batch, seq, dtype=torch.long)
labels = torch.arange(batch) % 4

total = 0.0
for step in range(warmup + steps):
    t0 = time.perf_counter()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    loss = torch.nn.functional.cross_entropy(head(pooled), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
    opt.step()
    if step >= warmup:
        total += time.perf_counter() - t0
ms = total * 1000 / steps
print(
    f"pytorch {torch.__version__} ({threads} threads) MiniLM batch {batch} seq {seq}: "
    f"{ms:.1f} ms/step, {batch * 1000 / ms:.1f} examples/s, final loss {loss.item():.4f}"
)
