#!/usr/bin/env python3
"""Fine-tune a small GPT-style model with AdaLomo from lomo_native (the lomo-optim drop-in).

The model (a character-level transformer defined below, starting from a random initialization
so that the example needs no download) is trained on the short text shipped next to this file
with the fine-tuning loop of lomo-optim: full-parameter AdaLomo with global norm clipping, every
parameter updated inside the backward pass and no gradient kept. It prints a progress bar, the
loss, a sample, and the peak memory. With the defaults (300 steps) it took 44 s on an idle
2-core CPU, 9 minutes on one shared with other jobs.

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # no GPU: CPU-only torch
    pip install "./bindings/python[torch]"
    python examples/python/finetune.py                  # CPU
    python examples/python/finetune.py --device cuda    # if the library has its CUDA backend
    python examples/python/finetune.py --steps 2        # smoke run
"""

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lomo_native.torch import AdaLomo

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------- model
class Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc, self.out = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    """Token and position embeddings, pre-LN blocks, a head tied to the token embedding."""

    def __init__(self, vocab, d=128, heads=4, layers=4, ctx=64):
        super().__init__()
        self.ctx = ctx
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: registered once, updated once per step
        for name, p in self.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))

    @torch.no_grad()
    def sample(self, idx, n, temperature=0.8):
        for _ in range(n):
            logits = self(idx[:, -self.ctx:])[:, -1].float() / temperature
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return idx


# -------------------------------------------------------------------------------------- data
def load_text(path):
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return torch.tensor([stoi[c] for c in text]), chars


def batches(data, ctx, batch, gen, device):
    while True:
        ix = torch.randint(len(data) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + ctx] for i in ix])
        y = torch.stack([data[i + 1:i + ctx + 1] for i in ix])
        yield x.to(device), y.to(device)


def loss_of(model, xy):
    x, y = xy
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


# ------------------------------------------------------------------------------------ report
class Progress:
    """A dependency-free progress bar on stderr."""

    def __init__(self, total, enabled=True, width=30):
        self.total, self.enabled, self.width, self.t0 = total, enabled, width, time.time()

    def update(self, i, **fields):
        if not self.enabled:
            return
        done = int(self.width * i / self.total)
        rate = i / max(time.time() - self.t0, 1e-9)
        eta = (self.total - i) / max(rate, 1e-9)
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        end = "\n" if i == self.total else ""
        print(f"\r[{'#' * done}{'.' * (self.width - done)}] {i}/{self.total} "
              f"{rate:.1f} it/s eta {eta:.0f}s {info}", end=end, file=sys.stderr, flush=True)


def cpu_has_bf16():
    """Whether this x86 CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: say nothing
    if "\nflags" not in info:
        return True  # not x86 (or no flags line): say nothing
    return "avx512_bf16" in info or "amx_bf16" in info


def peak_memory(device):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = f"peak host RSS {rss:.0f} MiB"
    if device.type == "cuda":
        out += f", peak CUDA allocated {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB"
    return out


# -------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=str(HERE / "tiny_corpus.txt"))
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak AdaLomo lr (cosine decay)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clip-grad-norm", type=float, default=1.0, help="0 disables")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data, chars = load_text(args.text)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    model = GPT(len(chars)).to(device=device, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({args.dtype}, {device}), "
          f"text: {len(data)} characters, vocabulary {len(chars)}")
    if args.dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        print("note: this CPU has no bf16 matrix instructions (AVX512-BF16/AMX), so PyTorch's bf16 "
              "matmuls are emulated and each step is many times slower than in float32 (the "
              "optimizer's own bf16 update is not the cost); use --dtype float32 here")

    # The lomo-optim signature, plus no weight decay for biases and norm weights.
    opt = AdaLomo(model, lr=args.lr, clip_grad_norm=args.clip_grad_norm or None,
                  weight_decay=0.01, no_decay=True)
    gen = torch.Generator().manual_seed(args.seed)
    train_it = batches(train, model.ctx, args.batch, gen, device)
    val_batch = next(batches(val, model.ctx, 32, torch.Generator().manual_seed(1), device))

    def val_loss():
        with torch.no_grad():
            return loss_of(model, val_batch).item()

    print(f"validation loss before: {val_loss():.3f} (uniform guess: {math.log(len(chars)):.3f})")
    bar = Progress(args.steps, enabled=not args.no_progress)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        xy = next(train_it)
        loss = loss_of(model, xy)
        if args.clip_grad_norm:
            opt.grad_norm(loss)        # first backward: global norm (and overflow check)
        opt.fused_backward(loss, lr)   # second backward: each parameter updated in place
        if step % 10 == 0 or step == args.steps:
            info = opt.step_info()
            bar.update(step, loss=f"{loss.item():.3f}", gnorm=f"{info.grad_norm:.2f}",
                       lr=f"{lr:.2e}")
    elapsed = time.time() - t0

    info = opt.step_info()
    print(f"validation loss after {args.steps} steps: {val_loss():.3f} "
          f"({elapsed:.1f} s; applied steps {info.step}, skipped {info.skipped_total}, "
          f"loss scale {info.loss_scale:g})")
    prompt = torch.tensor([[chars.index(c) for c in "The "]], device=device)
    text = "".join(chars[i] for i in model.sample(prompt, 120)[0].tolist())
    print("sample:", repr(text))
    print(peak_memory(device))
    try:
        st = opt.memory_stats()
        print(f"optimizer state {st['state_bytes'] / 2**10:.1f} KiB for "
              f"{st['param_bytes'] / 2**20:.2f} MiB of parameters "
              f"(AdamW would need {st['adamw_bytes'] / 2**20:.2f} MiB more)")
    except Exception:  # an older liblomo without lomo_memory_stats_get
        print("(optimizer memory accounting needs a newer liblomo)")


if __name__ == "__main__":
    main()
