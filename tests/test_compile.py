"""--compile on a CPU (inductor compiles C++ here: one test, about 20 s). On a CPU the encoder's dropout
(FastDropout's in-place draw) breaks the compiled graph into pieces and is drawn eagerly, so what depends
on compiled dropout masks (SMART's replay, the Bregman teacher) is checked on CUDA, in test_cuda.py."""
import shutil

import pytest
import torch

from model import compile_encoder
from predict import run_evaluation
from train import advance
from tests.fixtures import make_run

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler")


def test_a_compiled_encoder_takes_sophiah_refreshes_and_logged_diagnostics_and_compiles_as_counted(tiny):
    """Sophia-H differentiates its refresh steps' gradient again, which a compiled backward refuses ("compiled
    with non-empty donated buffers which requires create_graph=False"): refresh steps run the encoder
    eagerly. Logged steps differentiate the graph before the training backward does (SMART's gradient share,
    retain_graph), which a backward that donates its buffers refuses too: buffers are not donated.
    The graphs dynamo compiles, counted (torch 2.13, with PALs, SMART and Sophia-H): none on a refresh step,
    14 on the first compiled training step (the encoder's pieces between FastDropout's graph breaks, with and
    without SMART's input gradient), none more for another task or after, 4 more for the evaluation (no
    gradients). A count past dynamo's limit would stop the run (fail_on_recompile_limit_hit), not fall back
    to eager in silence."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run = make_run(tiny, "--optimizer", "sophiah", "--hess_interval", "2", "--smart", "--log_every", "1",
                   "--use_pal", "--pal_size", "4")
    compile_encoder(run.model)
    assert torch._dynamo.config.fail_on_recompile_limit_hit and torch._dynamo.config.recompile_limit >= 24
    run.model.train()
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    graphs = []
    for task in ("sst", "sts", "para"):  # steps 0 and 2 refresh the curvature, step 1 is compiled throughout
        losses, _ = advance(run, task)
        assert losses and run.diagnostics.end_step()["technique/smart_grad_share"] > 0
        graphs.append(counters["stats"]["unique_graphs"])
    run_evaluation(run.model, run.data["dev"], run.device, run.amp_context, 16)
    assert graphs + [counters["stats"]["unique_graphs"]] == [0, 14, 14, 18]
    assert run.missed_refreshes == 0 and run.skipped_steps == 0
    layer = run.model.bert.encoder.layer[0].attention.self.query.weight
    assert run.optimizer.state[layer]["hessian_updates"] == 2
    assert any(not torch.equal(p, before[n]) for n, p in run.model.named_parameters() if n in before)
