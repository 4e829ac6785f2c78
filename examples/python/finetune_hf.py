#!/usr/bin/env python3
"""Fine-tune a Llama-architecture model with lomo_native's AdaLomo and LOMO next to AdamW.

The model is a `transformers` LlamaForCausalLM (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU): by default a small one built from a LlamaConfig with random weights, so
that nothing is downloaded; `--model PATH` loads the weights (and tokenizer) of a local
checkpoint instead. It learns the byte-level text shipped next to this file (the Declaration of
Independence, public domain). Each optimizer trains the same initial model on the same batches,
in its own process (so that the peak memory is its own): lomo_native's AdaLomo and LOMO (fused:
each parameter updated inside the backward pass, two-pass global norm clipping), torch's AdamW,
and lomo-optim 0.1.1's AdaLomo when it is installed. It prints a progress bar (tqdm), the
losses, the optimizer memory and the peak memory, and plots the loss curves and the memory to a
PNG (matplotlib). A few minutes on 2 CPU cores with the defaults.

    pip install ./bindings/python torch transformers tqdm matplotlib
    python examples/python/finetune_hf.py                         # plain PyTorch loop
    python examples/python/finetune_hf.py --trainer hf            # LomoTrainer / Trainer
    python examples/python/finetune_hf.py --model ./my-llama --steps 100 --batch 4
    python examples/python/finetune_hf.py --steps 2 --no-plot     # smoke run
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("adalomo", "lomo", "adamw", "lomo-optim")
LABELS = {"adalomo": "AdaLomo (lomo_native)", "lomo": "LOMO (lomo_native)",
          "adamw": "AdamW (torch)", "lomo-optim": "AdaLomo (lomo-optim 0.1.1)"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a local transformers checkpoint (default: random init)")
    ap.add_argument("--text", default=str(HERE / "declaration_of_independence.txt"))
    ap.add_argument("--optimizers", default="adalomo,lomo,adamw,lomo-optim",
                    help="comma-separated, of " + ", ".join(OPTIMIZERS))
    ap.add_argument("--trainer", choices=["loop", "hf"], default="loop",
                    help="a plain PyTorch loop, or LomoTrainer (ours) / transformers.Trainer")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--clip-grad-norm", type=float, default=1.0, help="0 disables")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lr-adalomo", type=float, default=1e-2)
    ap.add_argument("--lr-lomo", type=float, default=0.3)
    ap.add_argument("--lr-adamw", type=float, default=3e-3)
    ap.add_argument("--plot", default=str(HERE.parent.parent / "docs" / "finetune_hf.png"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--save-results", help="also write the runs' results (JSON) here")
    ap.add_argument("--from-results", help="report and plot saved results instead of training")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and lomo CPU threads per run (1: no oversubscription)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", help=argparse.SUPPRESS)      # child process: one optimizer
    ap.add_argument("--result", help=argparse.SUPPRESS)   # where the child writes its JSON
    return ap.parse_args(argv)


# --------------------------------------------------------------------- one optimizer's run
def build_model(args):
    import torch
    import transformers

    torch.manual_seed(args.seed)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model,
                                                                  torch_dtype=torch.float32)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            tok = None
        return model, tok
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.ctx,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg), None


def token_ids(args, tok):
    import torch

    text = Path(args.text).read_text(encoding="utf-8")
    ids = tok(text)["input_ids"] if tok is not None else list(text.encode("utf-8"))
    return torch.tensor(ids, dtype=torch.long)


def windows(ids, n, ctx, seed):
    """n random windows of ctx tokens (the same for every optimizer)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(ids) - ctx, (n,), generator=g)
    return torch.stack([ids[i:i + ctx] for i in start])


def make_optimizer(name, model, args):
    import torch

    clip = args.clip_grad_norm or None
    if name in ("adalomo", "lomo"):
        from lomo_native.torch import AdaLomo, Lomo

        cls, lr = (AdaLomo, args.lr_adalomo) if name == "adalomo" else (Lomo, args.lr_lomo)
        return cls(model, lr=lr, clip_grad_norm=clip, weight_decay=args.weight_decay,
                   no_decay=True), lr
    if name == "adamw":
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": args.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=args.lr_adamw), args.lr_adamw
    import lomo_optim  # lomo-optim 0.1.1 allocates AdaLomo's state with .cuda() (bug B1):
    orig = torch.Tensor.cuda  # on a CPU machine make that the identity while it is built
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        return lomo_optim.AdaLomo(model, lr=args.lr_adalomo, clip_grad_norm=clip,
                                  weight_decay=args.weight_decay), args.lr_adalomo
    finally:
        torch.Tensor.cuda = orig


def state_bytes(name, opt):
    """Memory the optimizer itself keeps between steps, measured."""
    import torch

    if name in ("adalomo", "lomo"):
        st = opt.memory_stats()
        return st["state_bytes"] + st["workspace_bytes"]
    if name == "adamw":
        tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    else:
        tensors = [t for d in (opt.exp_avg_sq, opt.exp_avg_sq_row, opt.exp_avg_sq_col)
                   for t in d.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_loop(name, model, data, args, progress):
    import torch

    opt, base_lr = make_optimizer(name, model, args)
    fused = name != "adamw"
    losses, grad_bytes = [], 0
    bar = progress(range(args.steps), desc=LABELS[name])
    for step in bar:
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = data[step * args.batch:(step + 1) * args.batch]
        loss_of = lambda: model(input_ids=batch, labels=batch).loss  # noqa: E731
        if fused:
            if args.clip_grad_norm:
                opt.grad_norm(loss_of())     # first backward: the global norm only
            loss = loss_of()
            opt.fused_backward(loss, lr)     # second backward: each parameter updated in place
        else:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = loss_of()
            loss.backward()
            if args.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            grad_bytes = sum(p.grad.numel() * p.grad.element_size()
                             for p in model.parameters() if p.grad is not None)
            opt.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, state_bytes(name, opt), grad_bytes


def run_hf(name, model, data, args):
    import torch
    import transformers

    from lomo_native.transformers import LomoTrainer

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    optim = {"adalomo": "adalomo", "lomo": "lomo", "adamw": "adamw_torch",
             "lomo-optim": "adalomo"}[name]
    lr = {"adalomo": args.lr_adalomo, "lomo": args.lr_lomo, "adamw": args.lr_adamw,
          "lomo-optim": args.lr_adalomo}[name]
    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), optim=optim, learning_rate=lr, max_steps=args.steps,
        per_device_train_batch_size=args.batch, lr_scheduler_type="cosine",
        max_grad_norm=args.clip_grad_norm, weight_decay=args.weight_decay, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        disable_tqdm=args.no_progress)
    if name in ("adalomo", "lomo"):
        trainer = LomoTrainer(model=model, args=targs, train_dataset=Windows())
    else:  # the stock Trainer: AdamW, or lomo-optim's classes for optim="adalomo"
        orig = torch.Tensor.cuda
        if name == "lomo-optim" and not torch.cuda.is_available():
            torch.Tensor.cuda = lambda self, *a, **k: self  # lomo-optim's B1, see make_optimizer
        try:
            trainer = transformers.Trainer(model=model, args=targs, train_dataset=Windows())
            trainer.create_optimizer()
        finally:
            torch.Tensor.cuda = orig
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    opt = trainer.lomo_optimizer if name in ("adalomo", "lomo") else trainer.optimizer.optimizer
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) \
        if name == "adamw" else 0  # the Trainer keeps every gradient until optimizer.step()
    return losses, state_bytes(name, opt), grad_bytes


def run_one(args):
    import torch

    torch.set_num_threads(args.threads)
    # Subnormal floats make CPU arithmetic many times slower (AdamW's moments reach them here);
    # flushing them is the usual CPU training setting, the same for every optimizer. The
    # library keeps IEEE semantics inside its own work regardless (README: Semantics).
    torch.set_flush_denormal(True)
    model, tok = build_model(args)
    ids = token_ids(args, tok)
    data = windows(ids, args.steps * args.batch, args.ctx, args.seed + 1)
    val = windows(ids, 16, args.ctx, args.seed + 2)

    def val_loss():
        with torch.no_grad():
            return model(input_ids=val, labels=val).loss.item()

    try:
        from tqdm.auto import tqdm

        def progress(it, desc):
            return tqdm(it, desc=desc, disable=args.no_progress, leave=True)
    except ImportError:
        def progress(it, desc):
            return it
    before = val_loss()
    t0 = time.time()
    if args.trainer == "hf":
        losses, sbytes, gbytes = run_hf(args.run, model, data, args)
    else:
        losses, sbytes, gbytes = run_loop(args.run, model, data, args, progress)
    result = dict(
        name=args.run, losses=losses, val_before=before, val_after=val_loss(),
        seconds=time.time() - t0, state_bytes=sbytes, grad_bytes=gbytes,
        params=sum(p.numel() for p in model.parameters()),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------- driver and report
def available(name):
    if name != "lomo-optim":
        return True
    try:
        import lomo_optim  # noqa: F401
        return True
    except ImportError:
        return False


def plot(results, path, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    style = {"adalomo": dict(lw=2.4, alpha=0.8), "lomo-optim": dict(lw=1.0, ls="--", color="k")}
    for r in results:
        label = LABELS[r["name"]] + (" (dashed)" if r["name"] == "lomo-optim" else "")
        ax1.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label,
                 **style.get(r["name"], dict(lw=1.2)))
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (cross-entropy, bytes)")
    p = results[0]
    ax1.set_title(f"Llama, {p['params'] / 1e6:.2f} M parameters, {args.trainer} "
                  f"(batch {args.batch}×{args.ctx})", fontsize=10)
    ax1.legend()
    ax1.grid(alpha=0.3)
    names = [LABELS[r["name"]].replace(" (", "\n(") for r in results]
    state = [r["state_bytes"] / 2**20 for r in results]
    grads = [r["grad_bytes"] / 2**20 for r in results]
    ax2.bar(names, state, label="optimizer state and workspace (measured)")
    ax2.bar(names, grads, bottom=state, label="gradients kept until the step")
    ax2.axhline(p["param_bytes"] / 2**20, color="k", ls="--", lw=0.8, label="the parameters")
    ax2.set_ylabel("MiB")
    ax2.set_title("memory besides the model", fontsize=10)
    ax2.tick_params(axis="x", labelsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    args = parse_args()
    if args.run:
        return run_one(args)
    names = [n for n in args.optimizers.split(",") if n]
    for n in names:
        if n not in OPTIMIZERS:
            sys.exit(f"unknown optimizer {n!r} (choose from {', '.join(OPTIMIZERS)})")
    skipped = [n for n in names if not available(n)]
    if skipped:
        print(f"(skipping {', '.join(skipped)}: not installed)")
    results = []
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
        names = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LOMO_NUM_THREADS=str(args.threads))
        for n in [n for n in names if n not in skipped]:
            out = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--run", n, "--result", str(out)]
            subprocess.run(cmd, check=True, env=env)
            results.append(json.loads(out.read_text()))
    if args.save_results:
        Path(args.save_results).write_text(json.dumps(results))
    if not results:
        return
    print(f"\n{'optimizer':28} {'val loss':>15} {'time':>7} {'opt. state':>11} "
          f"{'grads kept':>11} {'peak RSS':>9}")
    for r in results:
        print(f"{LABELS[r['name']]:28} {r['val_before']:6.3f} → {r['val_after']:5.3f} "
              f"{r['seconds']:6.1f}s {r['state_bytes'] / 2**20:8.2f} MiB "
              f"{r['grad_bytes'] / 2**20:8.2f} MiB {r['peak_rss_mib']:6.0f} MiB")
    print(f"(model: {results[0]['params'] / 1e6:.2f} M parameters, "
          f"{results[0]['param_bytes'] / 2**20:.2f} MiB; peak RSS includes Python and torch)")
    if not args.no_plot:
        plot(results, args.plot, args)


if __name__ == "__main__":
    main()
