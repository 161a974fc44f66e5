"""Each technique's mechanism on the embedded MiniLM and real batches of the course data, at the defaults a
user gets: effects of the size the papers imply, not merely "the gradient changed". Tiny random models
hid a SMART term at 1e-11 of the loss and a Sophia that clipped 99.98% of its coordinates; these do not."""
import os

import pytest
import torch

from datasets import epoch_task_schedule
from flags import parse_args
from model import apply_trainable, build_model, output_kind, shared_parameters, task_loss
from pipeline import load_datasets
from smart import smart_adversarial_loss, smart_divergence, smart_perturbation
from state import Run
from techniques import gradient_norm, perturbed_logits_fn, teacher_logits
from tokenizer import BertTokenizer
from train import micro_batch_losses, set_learning_rate, train_step

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
needs_data = pytest.mark.skipif(not os.path.isfile(os.path.join(DATA_DIR, "ids-sst-train.csv")),
                                reason="the course data (data/, linked by ./setup.sh) is not present")
pytestmark = needs_data


def real_run(*flags: str, amp: str = "none", examples: int = 64) -> Run:
    """A Run of the embedded MiniLM on the first `examples` training rows of each task, model in train mode."""
    cfg = parse_args(["--data_dir", DATA_DIR, "--max_train_examples", str(examples), "--max_dev_examples", "8",
                      *flags])
    torch.manual_seed(cfg.seed)
    data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
    model = build_model(cfg)
    apply_trainable(model, cfg, epoch=0)
    run = Run(cfg, model, data, torch.device("cpu"), amp)
    run.model.train()
    return run


@pytest.fixture(scope="module")
def smart_run() -> Run:
    return real_run("--smart")


def first_batch(run: Run, task: str, size: int = 32) -> dict:
    return run.train_sets[task].collate(list(range(size)))


def smart_setting(run: Run) -> dict:
    cfg = run.cfg
    return dict(eps=cfg.smart_eps, step_size=cfg.smart_step_size, noise_var=cfg.smart_noise_var,
                steps=cfg.smart_steps, norm=cfg.smart_norm)


def encoder_gradient_norm(output: torch.Tensor, run: Run) -> float:
    grads = torch.autograd.grad(output, shared_parameters(run.model), retain_graph=True, allow_unused=True)
    return float(gradient_norm(grads))


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("task", ["sst", "sts"])
def test_smart_term_is_zero_without_perturbation_in_train_mode(smart_run, amp, task):
    """(c) The clean pass and the perturbed passes see the same network (dropout masks replayed, same
    precision), so the divergence at delta = 0 is exactly 0 with dropout on; independent masks gave 6e-3.
    On 8 rows (exactly 0 at any size): bf16 is emulated on AVX2-only CPUs, where 32 rows took 8-11 s."""
    smart_run.amp = amp
    with smart_run.amp_context():
        clean = smart_run.clean_forward(task, first_batch(smart_run, task, 8))
        again = perturbed_logits_fn(smart_run.model, task, clean)(clean.embeddings.detach())
    kind = output_kind(smart_run.model.specs[task], "ce")
    assert smart_divergence(again, clean.logits, kind).item() == 0.0
    smart_run.amp = "none"


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_smart_ascent_beats_random_perturbations_of_the_same_size(smart_run, amp):
    """(a) At the default eps the ascent's divergence is at least 2x that of random perturbations with
    the same per-token norms (measured: about 1000x; the old defaults' start noise swamped the step). On
    8 rows: bf16 is emulated on AVX2-only CPUs, where 32 rows took 50 s."""
    smart_run.amp = amp
    with smart_run.amp_context():
        clean = smart_run.clean_forward("sst", first_batch(smart_run, "sst", 8))
        logits_fn = perturbed_logits_fn(smart_run.model, "sst", clean)
        delta = smart_perturbation(logits_fn, clean.embeddings, clean.logits, "multiclass", clean.mask,
                                   generator=torch.Generator().manual_seed(0), **smart_setting(smart_run))
        x = clean.embeddings.detach()
        adversarial = smart_divergence(logits_fn(x + delta), clean.logits, "multiclass").item()
        generator, random = torch.Generator().manual_seed(1), []
        for _ in range(5):
            direction = torch.randn(delta.shape, generator=generator) * clean.mask.unsqueeze(-1)
            scaled = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-30) \
                * delta.float().norm(dim=-1, keepdim=True)
            random.append(smart_divergence(logits_fn(x + scaled.to(x.dtype)), clean.logits, "multiclass").item())
    smart_run.amp = "none"
    assert adversarial > 0
    assert adversarial >= 2 * max(random), (adversarial, random)


def test_smart_ascent_under_fp16_finds_most_of_what_fp32s_finds(smart_run):
    """Under fp16 the ascent's divergence is about the start's size squared, and its gradient at fp16
    activations fell to fp16's subnormal floor: the direction was built from zeros and rounding. Taken through
    the GradScaler's factor (the run's own scaler, enabled by --amp fp16 on a CPU too) it no longer underflows.
    Each task's fp16 delta is judged in fp32 on the same network (same dropout masks) against the fp32
    ascent's: over the three tasks it must reach on average at least 45% of the fp32 delta's divergence, and
    its move (delta - start) agree with fp32's at a mean cosine of at least 0.4.
    Measured on 8 rows per task at three draws (the default eps, step and start; a fresh head): through the
    scale a mean of 58-62% of fp32's divergence (each task 49-66%) and mean cosine 0.50-0.53 (each 0.23-0.71);
    without it 28-32% (12-42%) and 0.20-0.27. What is left is fp16's rounding of two nearby forward passes, not
    the scale: a bf16 ascent gets about as much (45-58% at one draw), a random move of the same size 0.1%. The
    issue that asked for this hoped for a cosine above 0.9; only an ascent in fp32 gets there, at several
    times the ascent's cost on a GPU, so the ascent runs in the step's precision."""
    run, found, cosines = smart_run, [], []
    scaler = Run(run.cfg, run.model, run.data, torch.device("cpu"), "fp16").scaler
    assert scaler.is_enabled()
    for task in ("sst", "para", "sts"):
        kind, batch = output_kind(run.model.specs[task], "ce"), first_batch(run, task, 8)
        moves, deltas = {}, {}
        for amp in ("none", "fp16"):
            run.amp = amp
            with run.amp_context():
                torch.manual_seed(0)  # the same dropout masks in both precisions
                clean = run.clean_forward(task, batch)
                logits_fn = perturbed_logits_fn(run.model, task, clean)
                ascend = lambda steps, scale: smart_perturbation(  # noqa: E731
                    logits_fn, clean.embeddings, clean.logits, kind, clean.mask, grad_scale=scale,
                    generator=torch.Generator().manual_seed(1), **{**smart_setting(run), "steps": steps}).float()
                deltas[amp] = ascend(run.cfg.smart_steps, scaler.scale(torch.ones(())))
                moves[amp] = (deltas[amp] - ascend(0, 1.0)).flatten()  # the start: the same draw
        run.amp = "none"
        torch.manual_seed(0)
        clean = run.clean_forward(task, batch)
        logits_fn = perturbed_logits_fn(run.model, task, clean)
        with torch.no_grad():
            fp32, fp16 = (smart_divergence(logits_fn(clean.embeddings + deltas[amp]), clean.logits, kind).item()
                          for amp in ("none", "fp16"))
        assert fp16 > 0, task
        found.append(fp16 / fp32)
        cosines.append(torch.nn.functional.cosine_similarity(moves["fp16"], moves["none"], dim=0).item())
    assert sum(found) / 3 >= 0.45, found
    assert sum(cosines) / 3 >= 0.4, cosines


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_smart_gradient_is_a_real_share_of_the_task_gradient(smart_run, task):
    """(b) The adversarial term's gradient on the encoder is at least 1% of the task loss's (measured at
    the defaults on a fresh head: 11% sst, 14% para, 2.5% sts; the old defaults gave 2e-10), and the
    logged technique/smart_grad_share is that ratio."""
    run = smart_run
    kind = output_kind(run.model.specs[task], "ce")
    batch = first_batch(run, task, 16)
    clean = run.clean_forward(task, batch)
    loss = task_loss(run.model.specs[task], clean.logits, batch["labels"])
    generator_state = run.technique_generator.get_state()
    term = smart_adversarial_loss(perturbed_logits_fn(run.model, task, clean), clean.embeddings, clean.logits,
                                  kind, clean.mask, generator=run.technique_generator, **smart_setting(run))
    ratio = run.cfg.smart_weight * encoder_gradient_norm(term, run) / encoder_gradient_norm(loss, run)
    assert ratio >= 0.01, ratio

    run.technique_generator.set_state(generator_state)  # the same starting noise for the loop's own term
    run.diagnostics.active = True
    run.regularize(loss, task, clean)
    logged = run.diagnostics.end_step()
    run.diagnostics.active = False
    assert logged["technique/smart_term"] == pytest.approx(term.item(), rel=1e-5)
    assert logged["technique/smart_grad_share"] == pytest.approx(ratio, rel=1e-4)


@pytest.fixture(scope="module")
def rdrop_run() -> Run:
    return real_run("--rdrop", "1")


@pytest.mark.parametrize("task, least", [("sst", 0.003), ("para", 0.005), ("sts", 0.0006)])
def test_rdrop_passes_differ_by_their_masks_alone_and_the_term_is_a_real_share(rdrop_run, task, least):
    """R-Drop's two passes of a real batch differ in train mode (their own dropout masks at the default
    --encoder_dropout 0.05 and head dropout 0.1) and not at all in eval mode; at the paper's alpha 1 the
    term's gradient on the encoder is half the measured share or more (a fresh head: 0.6% sst, 1.1% para,
    0.13% sts; after 60 steps of training 3.6%, 2.0%, 2.0%: docs/techniques.md)."""
    run = rdrop_run
    batch = first_batch(run, task)
    for training in (True, False):
        run.model.train(training)
        clean = run.clean_forward(task, batch)
        loss = task_loss(run.model.specs[task], clean.logits, batch["labels"])
        run.diagnostics.active = True
        run.rdrop(loss, task, clean)
        logged = run.diagnostics.end_step()
        if training:
            assert logged["technique/rdrop_term"] > 1e-4 and logged["technique/rdrop_grad_share"] >= least, logged
        else:
            assert logged["technique/rdrop_term"] == 0.0
    run.model.train()


def test_bregman_teacher_is_compared_like_with_like():
    """A momentum teacher with the student's weights gives a Bregman term of exactly 0 in train mode:
    same mode, same dropout masks, same precision (an eval-mode teacher gave a dropout-sized term)."""
    run = real_run("--smart", "--smart_bregman_weight", "1")
    for amp in ("none", "bf16"):
        run.amp = amp
        with run.amp_context():
            clean = run.clean_forward("sst", first_batch(run, "sst", 8))  # 8 rows: bf16 may be emulated
            teacher = teacher_logits(run.ema_model, run.model, "sst", clean)
        assert run.ema_model.training
        assert smart_divergence(clean.logits, teacher, "multiclass").item() == 0.0, amp


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah"])
def test_sophia_defaults_leave_the_cited_share_of_coordinates_unclipped(optimizer):
    """At the default rho, between 10% and 45% of the coordinates are unclipped after two Hessian
    refreshes on real batches of 16 (the official README advises 10-50% for train/win_rate; measured:
    ~27%). With the old rho 0.04 and an uncorrected EMA it was 0.1% for sophiag: the Hessian played no
    part. The upper bound is 45%, not 50%, for Sophia-H: about half of Hutchinson's estimates are
    negative and always clipped, so 50% means no positive coordinate is ever clipped (rho 0.04 gives that)."""
    run = real_run("--optimizer", optimizer, "--hess_interval", "4", "--batch_size", "16")
    schedule = epoch_task_schedule(run.cfg.task_scheduler, run.sizes, 6, run.schedule_generator, 0, 1)
    for task in schedule:  # refreshes at steps 0 and 4
        set_learning_rate(run, task)
        train_step(run, [task])
        run.step += 1
    unclipped, hessian_mean = run.optimizer.clip_statistics()
    assert 0.10 <= unclipped.item() <= 0.45, unclipped.item()
    assert hessian_mean.item() != 0


@pytest.mark.parametrize("task", ["sst", "para"])
def test_label_smoothing_moves_the_encoder_gradient_by_about_eps(task):
    """At --label_smoothing 0.1 the loop's loss on a real batch differs from the plain loss, and the encoder
    gradient of the difference is about eps times the plain loss's on a fresh head (0.098 sst, 0.100 para;
    after 60 steps 0.093 and 0.161: docs/techniques.md); on STS the loss is the plain one."""
    run = real_run("--label_smoothing", "0.1")
    run.model.eval()  # the same logits in both passes
    for name in ("sst", "para", "sts"):
        indices = list(range(32))
        smoothed = next(micro_batch_losses(run, name, indices))[0]
        batch = first_batch(run, name)
        plain = task_loss(run.model.specs[name], run.model.logits(name, batch), batch["labels"])
        if name == "sts":
            assert torch.equal(smoothed, plain)
        elif name == task:
            share = encoder_gradient_norm(smoothed - plain, run) / encoder_gradient_norm(plain, run)
            assert 0.05 <= share <= 0.2, share
