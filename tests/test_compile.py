"""--compile on a CPU (inductor compiles C++ here: one test, about 20 s). On a CPU the encoder's dropout
(FastDropout's in-place draw) breaks the compiled graph into pieces and is drawn eagerly, so what depends
on compiled dropout masks (SMART's replay, the Bregman teacher) is checked on CUDA, in test_cuda.py."""
import shutil

import pytest
import torch

import multitask_classifier as mc
from tests.test_training import make_run

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler")


def test_a_compiled_encoder_takes_sophiah_refreshes_and_logged_diagnostics(tiny):
    """Sophia-H differentiates its refresh steps' gradient again, which a compiled backward refuses ("compiled
    with non-empty donated buffers which requires create_graph=False"): refresh steps run the encoder
    eagerly. Logged steps differentiate the graph before the training backward does (SMART's gradient share,
    retain_graph), which a backward that donates its buffers refuses too: buffers are not donated."""
    torch._dynamo.reset()
    run = make_run(tiny, "--optimizer", "sophiah", "--hess_interval", "2", "--smart", "--log_every", "1")
    mc.compile_encoder(run.model)
    run.model.train()
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    for task in ("sst", "sts", "para"):  # step 0 and 2 refresh the curvature, step 1 is compiled throughout
        losses, _ = mc.advance(run, task)
        assert losses and run.diagnostics.end_step()["technique/smart_grad_share"] > 0
    assert run.missed_refreshes == 0 and run.skipped_steps == 0
    layer = run.model.bert.encoder.layer[0].attention.self.query.weight
    assert run.optimizer.state[layer]["hessian_updates"] == 2
    assert any(not torch.equal(p, before[n]) for n, p in run.model.named_parameters() if n in before)
