"""Hugging Face Trainer integration on a tiny Llama (CPU): the stock Trainer with our optimizer
(non-fused step()), LomoTrainer (fused), each against a hand-written loop over the very batches
the Trainer fed the model (recorded), with the learning rates written out from the schedule's
formula, the no-decay names chosen by hand, and lomo-optim 0.1.1 where it applies."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from conftest import reference_optimizer  # noqa: E402
from lomo_native.torch import AdaLomo, Lomo  # noqa: E402
from lomo_native.transformers import LomoTrainer, lomo_optimizer_cls_and_kwargs  # noqa: E402

OURS = {"lomo": Lomo, "adalomo": AdaLomo}
BASE_LR = {"lomo": 0.05, "adalomo": 0.01}
STEPS = 4


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=9):
        g = torch.Generator().manual_seed(5)
        self.seqs = torch.randint(0, 32, (n, length), generator=g)

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i], "labels": self.seqs[i].clone()}


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=1)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def linear_lrs(base, steps=STEPS, warmup=1):
    """get_linear_schedule_with_warmup's formula, written out."""
    return [base * (t / warmup if t < warmup else (steps - t) / (steps - warmup))
            for t in range(steps)]


def recording(cls):
    """The Trainer class, recording each micro-batch (and the token count the loss is divided by)."""

    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen = getattr(self, "seen", [])
            self.seen.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return Recording


def loss_of(model, inputs, n):
    return model(**inputs, num_items_in_batch=n).loss if n is not None else model(**inputs).loss


def no_decay_names(model):
    return [n for n, _ in model.named_parameters() if "norm" in n or n.endswith("bias")]


def assert_same_params(a, b, rtol=0.0, atol=0.0):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if rtol:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=n)
        else:
            assert torch.equal(p.detach(), q.detach()), n


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


# ------------------------------------------------------------------- stock Trainer, step()
@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_stock_trainer_with_our_optimizer_matches_lomo_optim(algo, tmp_path):
    """transformers.Trainer(optimizers=(ours, scheduler)): plain backward, the Trainer clips
    .grad (max_grad_norm), our step() applies it. lomo-optim (grad_norm + fused_backward with
    the same clipping formula) over the recorded batches and lrs is the reference."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    opt = OURS[algo](model, lr=BASE_LR[algo])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    trainer = recording(transformers.Trainer)(
        model=model, args=training_args(tmp_path, max_grad_norm=1.0), train_dataset=Tokens(),
        optimizers=(opt, sched))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        trainer.train()
    ref = reference_optimizer(algo, ref_model, lr=BASE_LR[algo], clip_grad_norm=1.0)
    for t, (inputs, n) in enumerate(trainer.seen):
        ref.grad_norm(loss_of(ref_model, inputs, n))
        ref.fused_backward(loss_of(ref_model, inputs, n), BASE_LR[algo] / (1 + t))
    assert len(trainer.seen) == STEPS and opt.step_info().step == STEPS
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_llama().parameters()))


def test_stock_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    """The helper for the stock Trainer: args' lr, weight decay without biases and norms, the
    lr scheduler from TrainingArguments; reference: our fused path by hand, no-decay by name."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=0.01, weight_decay=0.1,
                         max_grad_norm=0.0)
    trainer = recording(transformers.Trainer)(
        model=model, args=args, train_dataset=Tokens(),
        optimizer_cls_and_kwargs=lomo_optimizer_cls_and_kwargs(args, model, algorithm="adalomo"))
    trainer.train()
    ref = AdaLomo(ref_model, lr=0.01, weight_decay=0.1,
                  groups=[{"params": no_decay_names(ref_model), "weight_decay": 0.0}])
    for (inputs, n), lr in zip(trainer.seen, linear_lrs(0.01)):
        ref.fused_backward(loss_of(ref_model, inputs, n), lr)
    assert_same_params(model, ref_model)


# ------------------------------------------------------------------------ LomoTrainer
@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_lomo_trainer_from_training_arguments(algo, tmp_path):
    """optim=, learning_rate, linear warmup schedule, weight_decay (not for norms), max_grad_norm
    (two-pass): bit-identical to the fused path driven by hand; the logged grad norms are the
    reference's; no lr-scheduler warning."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    args = training_args(tmp_path, optim=algo, learning_rate=BASE_LR[algo], weight_decay=0.1,
                         max_grad_norm=0.5)
    trainer = recording(LomoTrainer)(model=model, args=args, train_dataset=Tokens())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        trainer.train()
    assert type(trainer.lomo_optimizer) is OURS[algo]
    ref = OURS[algo](ref_model, lr=1.0, weight_decay=0.1, clip_grad_norm=0.5,
                     groups=[{"params": no_decay_names(ref_model), "weight_decay": 0.0}])
    norms = []
    for (inputs, n), lr in zip(trainer.seen, linear_lrs(BASE_LR[algo])):
        ref.grad_norm(loss_of(ref_model, inputs, n))
        norms.append(ref.step_info().grad_norm)
        ref.fused_backward(loss_of(ref_model, inputs, n), lr)
    assert len(trainer.seen) == STEPS
    assert_same_params(model, ref_model)
    assert logged(trainer, "grad_norm") == pytest.approx(norms, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_lomo_trainer_matches_lomo_optim(algo, tmp_path):
    """No weight decay (lomo-optim decays everything): against lomo-optim's fused path."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    args = training_args(tmp_path, optim=algo, learning_rate=BASE_LR[algo], max_grad_norm=1.0,
                         lr_scheduler_type="constant", weight_decay=0.0)
    trainer = recording(LomoTrainer)(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    ref = reference_optimizer(algo, ref_model, lr=BASE_LR[algo], clip_grad_norm=1.0)
    for inputs, n in trainer.seen:
        ref.grad_norm(loss_of(ref_model, inputs, n))
        ref.fused_backward(loss_of(ref_model, inputs, n), BASE_LR[algo])
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)


def test_lomo_trainer_passed_optimizer_and_scheduler(tmp_path):
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    opt = Lomo(model, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = recording(LomoTrainer)(model=model, args=training_args(tmp_path, max_grad_norm=0),
                                     train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train()
    ref = Lomo(ref_model, lr=0.05)
    for t, (inputs, n) in enumerate(trainer.seen):
        ref.fused_backward(loss_of(ref_model, inputs, n), 0.05 * 0.5 ** t)
    assert_same_params(model, ref_model)
    assert logged(trainer, "grad_norm") == []  # no norm pass without clipping: nothing to log


def test_lomo_trainer_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """gradient_accumulation_steps=2 (fused, accumulated in the library): equal to one fused
    step on the two micro-batches concatenated (the loss is a mean over all their tokens)."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    args = training_args(tmp_path, optim="adalomo", learning_rate=0.01, max_grad_norm=1.0,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         lr_scheduler_type="constant")
    trainer = recording(LomoTrainer)(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    assert len(trainer.seen) == 2 * STEPS
    ref = AdaLomo(ref_model, lr=0.01, clip_grad_norm=1.0)
    for t in range(STEPS):
        (a, _), (b, _) = trainer.seen[2 * t: 2 * t + 2]
        whole = {k: torch.cat([a[k], b[k]]) for k in a}
        ref.grad_norm(ref_model(**whole).loss)
        ref.fused_backward(ref_model(**whole).loss, 0.01)
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)
    opt = trainer.lomo_optimizer
    assert opt.step_info().step == STEPS
    # the fused path: buffers in the library (f32, 4 B per element), no .grad left
    assert opt.accumulation_steps == 2
    assert opt.native.accum_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_lomo_trainer_accumulates_with_a_passed_optimizer_and_short_steps(tmp_path):
    """gradient_accumulation_steps=3 over 8 micro-batches per epoch (steps of 3, 3, 2, then
    3), with a Lomo passed in (the Trainer enables its f32 buffers), norm clipping and a
    linear schedule: each step equals one fused step on its micro-batches concatenated."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    opt = Lomo(model, lr=0.05, clip_grad_norm=1.0)
    args = training_args(tmp_path, learning_rate=0.05, max_grad_norm=1.0,
                         gradient_accumulation_steps=3)
    cls = recording(LomoTrainer)

    class Syncs(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.syncs = getattr(self, "syncs", [])
            self.syncs.append(self.accelerator.gradient_state.sync_gradients)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Syncs(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train()
    assert opt.accumulation_steps == 3
    groups, cur = [], []
    for (inputs, _), sync in zip(trainer.seen, trainer.syncs):
        cur.append(inputs)
        if sync:
            groups.append(cur)
            cur = []
    assert [len(g) for g in groups] == [3, 3, 2, 3] and not cur
    ref = Lomo(ref_model, lr=0.05, clip_grad_norm=1.0)
    for lr, group in zip(linear_lrs(0.05), groups):
        whole = {k: torch.cat([b[k] for b in group]) for k in group[0]}
        ref.grad_norm(ref_model(**whole).loss)
        ref.fused_backward(ref_model(**whole).loss, lr)
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)
    assert opt.step_info().step == STEPS


def test_lomo_trainer_fp16_dynamic_scaling_skips_and_holds_the_schedule(tmp_path):
    """An fp16 model with Lomo: the library's dynamic scaler starts too high on purpose
    (2^24: the first steps overflow) and backs off; skipped steps leave the parameters and the
    lr schedule where they were. Reference: the same protocol by hand, advancing the schedule
    only after applied steps; the logged loss scale and skip count are the reference's."""
    model = tiny_llama(torch.float16)
    ref_model = copy.deepcopy(model)
    steps = 12
    args = training_args(tmp_path, optim="lomo", learning_rate=0.05, max_grad_norm=1.0,
                         max_steps=steps, warmup_steps=0, per_device_train_batch_size=2)
    scale_args = dict(init_scale=2.0 ** 24, scale_window=1000)
    trainer = recording(LomoTrainer)(model=model, args=args, train_dataset=Tokens(),
                                     lomo_kwargs=dict(loss_scale_args=scale_args))
    trainer.train()
    ref = Lomo(ref_model, lr=0.05, clip_grad_norm=1.0, loss_scale_args=scale_args)
    applied, scales = 0, []
    for inputs, n in trainer.seen:
        lr = 0.05 * (steps - applied) / steps
        ref.grad_norm(loss_of(ref_model, inputs, n))
        ref.fused_backward(loss_of(ref_model, inputs, n), lr)
        applied += not ref.step_info().skipped
        scales.append(ref.loss_scale)
    info = ref.step_info()
    assert 0 < info.skipped_total < steps and info.step == applied
    assert_same_params(model, ref_model)
    assert logged(trainer, "loss_scale") == scales
    assert logged(trainer, "skipped_steps")[-1] == info.skipped_total


@pytest.mark.parametrize("algo,dtype,kind", [("adalomo", torch.float32, "LomoTrainer"),
                                              ("lomo", torch.float16, "LomoTrainer"),
                                              ("adalomo", torch.float32, "Trainer")])
def test_checkpoint_resume_is_bit_identical(algo, dtype, kind, tmp_path):
    """Straight through 6 steps, or 3 steps + checkpoint + a new Trainer resuming from it:
    the same parameters and optimizer state, bit for bit. LomoTrainer (fused), and the stock
    Trainer with our optimizer passed (non-fused step(), the Trainer clips .grad)."""
    def run(out, resume=None, steps=6):
        model = tiny_llama(dtype)
        args = training_args(out, optim=algo if kind == "LomoTrainer" else "adamw_torch",
                             learning_rate=BASE_LR[algo], max_grad_norm=1.0,
                             max_steps=steps, save_strategy="steps", save_steps=3,
                             per_device_train_batch_size=2, weight_decay=0.01)
        if kind == "LomoTrainer":
            trainer = LomoTrainer(model=model, args=args, train_dataset=Tokens())
            trainer.train(resume_from_checkpoint=resume)
            return model, trainer.lomo_optimizer
        opt = OURS[algo](model, lr=BASE_LR[algo], weight_decay=0.01, no_decay=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                       optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    straight, opt_a = run(tmp_path / "a")
    resumed, opt_b = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert_same_params(resumed, straight)
    assert opt_b.step_info().step == opt_a.step_info().step == 6
    assert opt_a.native.state_bytes() == opt_b.native.state_bytes()
    partial, _ = run(tmp_path / "c", steps=3)  # guards against a resume that retrains all 6
    assert not all(torch.equal(p, q) for p, q in zip(partial.parameters(), straight.parameters()))


def test_lomo_trainer_refuses_what_it_cannot_honour(tmp_path):
    model = tiny_llama()
    ds = Tokens()
    with pytest.raises(ValueError, match="optim="):
        LomoTrainer(model=model, args=training_args(tmp_path), train_dataset=ds)
    with pytest.raises(TypeError, match="Lomo or AdaLomo"):
        LomoTrainer(model=model, args=training_args(tmp_path), train_dataset=ds,
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    opt = AdaLomo(model)
    with pytest.raises(ValueError, match="clip_grad_norm"):  # max_grad_norm defaults to 1.0
        LomoTrainer(model=model, args=training_args(tmp_path), train_dataset=ds,
                    optimizers=(opt, None))
    opt.remove()
