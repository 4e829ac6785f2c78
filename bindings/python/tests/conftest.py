"""Shared helpers: small models, lomo-optim on a CPU-only torch, ulp comparison."""

import contextlib
import math

import pytest
import torch

torch.set_num_threads(1)


@contextlib.contextmanager
def cuda_is_identity():
    """lomo-optim's AdaLomo allocates its state with an unconditional ``.cuda()`` (bug B1);
    make it the identity while the reference is constructed, as the reference harness does."""
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def reference_optimizer(name, model, **kw):
    lomo_optim = pytest.importorskip("lomo_optim")
    if name == "lomo":
        return lomo_optim.Lomo(model, **kw)
    with cuda_is_identity():
        return lomo_optim.AdaLomo(model, **kw)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


class Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.out = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    """A small GPT-style transformer (token + position embedding, 2 pre-LN blocks, head)."""

    def __init__(self, vocab=17, d=16, heads=2, layers=2, ctx=8, tie=False):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def make_model(kind, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = MLP() if kind == "mlp" else TinyGPT(**kw)
    return model.to(dtype)


def make_batches(kind, dtype, steps, seed=1, vocab=17):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if kind == "mlp":
            out.append((torch.randn(8, 4, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)))
        else:
            seq = torch.randint(0, vocab, (4, 9), generator=g)
            out.append((seq[:, :-1], seq[:, 1:]))
    return out


def loss_fn(kind, model, batch):
    x, y = batch
    if kind == "mlp":
        return ((model(x) - y) ** 2).mean()
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def ulp_distance(a, b):
    """Elementwise distance in units in the last place for bf16/f16 tensors of equal sign."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    # map sign-magnitude to a monotonic integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()
