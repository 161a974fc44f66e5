"""The fp16 path, run on a CPU (torch has fp16 autocast and a GradScaler there): the scaler, unscaling
before clipping, skipped steps, gradient surgery under one scale, SMART's ascent, Sophia's estimates,
R-Drop. Each case trains the same 4 steps (same rows, same dropout masks) in fp16 and in fp32, on real
rows of the course data and the embedded MiniLM cut to its first two layers: its real weights and scales,
at a third of its cost, because fp16 matmuls on a CPU without fp16 hardware are about 10x slower than
fp32 ones (84 ms each at 128 tokens x 384 on the Zen 3 EPYC: an fp16 step of the whole model with SMART
and R-Drop took 18 s there)."""
import os

import pytest

from tests.fixtures import CASES, DATA_DIR, check_against_fp32


pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DATA_DIR, "ids-sst-train.csv")),
                                reason="the course data (data/, linked by ./setup.sh) is not present")


@pytest.mark.parametrize("case", CASES)
def test_every_technique_trains_in_fp16_as_in_fp32(minilm_two_layers, case):
    check_against_fp32(minilm_two_layers, case, "fp16", "cpu")


