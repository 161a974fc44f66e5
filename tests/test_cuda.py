"""CUDA paths: run by the prepared GPU check (`bash .ci/gpu`), skipped on machines without a GPU.
No CUDA path of this project had run before these were written; each asserts what the CPU tests assert
of the same path, on the device."""
import os

import pytest
import torch

from model import compile_encoder
import multitask_classifier as mc
from optimizer import AdamW
from pipeline import to_device
from rundir import load_checkpoint
from smart import bregman_divergence, smart_divergence
from techniques import perturbed_logits_fn, teacher_logits
import train
from train import advance
from tests.fixtures import CASES, check_against_fp32, make_run, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash .ci/gpu)")


def finite_metrics(metrics: dict) -> bool:
    return all(torch.isfinite(torch.tensor(v)) for task, m in metrics.items() if task != "overall"
               for v in m.values())


@pytest.mark.parametrize("deterministic", [False, True])
def test_resume_on_cuda_continues_from_a_mid_epoch_checkpoint(tiny, tmp_path, monkeypatch, deterministic):
    """Within 1e-4; exactly under torch.use_deterministic_algorithms (bash .ci/gpu sets the
    CUBLAS_WORKSPACE_CONFIG that deterministic cuBLAS needs before CUDA starts)."""
    if deterministic:
        if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
            pytest.skip("needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts (bash .ci/gpu sets it)")
        torch.use_deterministic_algorithms(True)
    try:
        resume_on_cuda(tiny, tmp_path, monkeypatch, deterministic)
    finally:
        torch.use_deterministic_algorithms(False)


def resume_on_cuda(tiny, tmp_path, monkeypatch, exact: bool):
    args = ["--device", "cuda", "--epochs", "2", "--num_batches_per_epoch", "10", "--checkpoint_every", "4",
            "--lr", "1e-3"]
    uninterrupted = mc.main(tiny_args(tiny, tmp_path / "a", *args))
    real_advance = advance

    def crash_at_step_seven(run, task):
        if run.step == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_advance(run, task)
    monkeypatch.setattr(train, "advance", crash_at_step_seven)
    with pytest.raises(KeyboardInterrupt):
        mc.main(tiny_args(tiny, tmp_path / "b", *args))
    monkeypatch.setattr(train, "advance", real_advance)
    resumed = mc.main(["--resume", str(tmp_path / "b")])  # RNG states load on the CPU, then move
    if exact:
        assert resumed == uninterrupted
    else:
        assert resumed["overall"] == pytest.approx(uninterrupted["overall"], abs=1e-4)


def test_a_cuda_checkpoint_keeps_its_own_gpus_random_state_and_resumes_an_older_one(tiny):
    run = make_run(tiny, device="cuda")
    state = run.state_dict()
    assert torch.is_tensor(state["cuda_rng"])  # one state: the run's GPU
    before = torch.cuda.get_rng_state(run.device)
    torch.rand(100, device="cuda")
    older = [state["cuda_rng"]] * (torch.cuda.device_count() + 3)  # every GPU visible then, more than now
    run.load_state_dict({**state, "cuda_rng": older})
    assert torch.equal(torch.cuda.get_rng_state(run.device), before)


def test_technique_draws_come_from_a_generator_on_the_gpu_saved_with_the_run(tiny):
    """SMART's start noise and Hutchinson's probes are drawn on the GPU (a CPU generator copied them over:
    about 440 MB per curvature refresh for bert-base), from a generator whose state last.pt keeps."""
    run = make_run(tiny, "--smart", "--optimizer", "sophiah", device="cuda")
    assert run.technique_generator.device.type == "cuda"
    state = run.state_dict()["technique_generator"]
    first = torch.randn(4, generator=run.technique_generator, device="cuda")
    run.technique_generator.set_state(state)
    assert torch.equal(torch.randn(4, generator=run.technique_generator, device="cuda"), first)


@pytest.mark.parametrize("amp", ["fp16", "bf16", "none"])
def test_each_precision_trains_on_cuda(tiny, tmp_path, amp):
    metrics = mc.main(tiny_args(tiny, tmp_path / "run", "--device", "cuda", "--amp", amp, "--epochs", "2"))
    assert finite_metrics(metrics)
    state = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert state["progress"]["skipped_steps"] <= (6 if amp == "fp16" else 0)  # GradScaler's first overflows


@pytest.mark.parametrize("flags", [["--smart", "--smart_bregman_weight", "1"], ["--optimizer", "sophiah"],
                                   ["--optimizer", "sophiag"], ["--projection", "gradvac"], ["--compile"]])
def test_techniques_run_on_cuda(tiny, tmp_path, flags):
    metrics = mc.main(tiny_args(tiny, tmp_path / "run", "--device", "cuda", *flags))
    assert finite_metrics(metrics)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_smart_replays_cuda_dropout_masks(tiny, amp):
    run = make_run(tiny, "--smart", amp=amp, device="cuda")
    run.model.train()
    batch = to_device(run.train_sets["sst"].collate(list(range(8))), run.device)
    with run.amp_context():
        clean = run.clean_forward("sst", batch)
        again = perturbed_logits_fn(run.model, "sst", clean)(clean.embeddings.detach())
    assert smart_divergence(again, clean.logits, "multiclass").item() == 0.0


def test_compiled_encoder_matches_eager_on_cuda(tiny):
    eager, compiled = make_run(tiny, device="cuda"), make_run(tiny, device="cuda")
    compile_encoder(compiled.model)
    batch = to_device(eager.data["dev"]["sst"].collate(list(range(16))), eager.device)
    with torch.no_grad():
        a = eager.model.eval().logits("sst", batch)
        b = compiled.model.eval().logits("sst", batch)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_foreach_adamw_matches_torch_on_cuda():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, device="cuda", requires_grad=True) for _ in range(3)]
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    ours, theirs = AdamW(params, lr=1e-3, weight_decay=0.01), torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.01)
    for _ in range(5):
        for p, q in zip(params, reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_with_the_encoder_compiled_the_bregman_term_is_0_at_step_0_in_train_mode(tiny):
    """The momentum teacher is an eager copy; the student's dropout masks come from compiled code. Compiled
    with fallback_random, the same random state gives the same masks, so at step 0 (teacher = student) the
    term is 0 up to the compiled kernels' rounding; with inductor's own generator it was dropout noise."""
    run = make_run(tiny, "--smart", "--smart_bregman_weight", "1", device="cuda")
    compile_encoder(run.model)
    run.model.train()
    batch = to_device(run.train_sets["sst"].collate(list(range(8))), run.device)
    clean = run.clean_forward("sst", batch)
    teacher = teacher_logits(run.ema_model, run.model, "sst", clean)
    assert bregman_divergence(clean.logits, teacher, "multiclass").item() < 1e-8
    again = perturbed_logits_fn(run.model, "sst", clean)(clean.embeddings.detach())  # SMART's replay
    assert smart_divergence(again, clean.logits, "multiclass").item() < 1e-8


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_every_technique_trains_on_cuda_in_fp16_and_bf16_as_in_fp32(minilm_two_layers, case, amp):
    """tests/test_fp16.py's check on the GPU: at most one skipped step in 4, parameters moved, SMART's term
    positive, Sophia refreshed, diagnostics within test_fp16's bounds of fp32's."""
    check_against_fp32(minilm_two_layers, case, amp, "cuda")
