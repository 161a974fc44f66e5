"""Predictions (predict.py): the symmetric pair tasks read in both orders, the cosine head in one."""
import os

import numpy as np
import pytest
import torch

from flags import parse_args
from model import build_model
from pipeline import load_datasets
from predict import outputs_meta, run_evaluation
from tokenizer import BertTokenizer
from tests.fixtures import make_run, tiny_args


def test_the_cosine_sts_head_is_read_in_one_order(tiny):
    """Both orders are for pairs encoded jointly: the cosine head encodes each STS sentence alone, so dev and
    test read STS once, and the outputs' meta says which tasks were read in both orders."""
    cfg = parse_args(tiny_args(tiny, "unused", "--sts_head", "cosine"))
    data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
    assert data["dev"]["para"].swapped is not None and data["dev"]["sts"].swapped is None
    assert outputs_meta(cfg, "dev", list(cfg.task_names))["both_orders"] == ["para"]
    one_order = parse_args(tiny_args(tiny, "unused", "--no-eval_both_orders"))
    assert outputs_meta(one_order, "test", list(one_order.task_names))["both_orders"] == []


def swapped_pairs_copy(data_dir: str, folder) -> str:
    """A copy of the course data with sentence1 and sentence2 exchanged in every pair task's dev file."""
    os.makedirs(folder)
    for name in os.listdir(data_dir):
        lines = open(os.path.join(data_dir, name)).read().splitlines()
        if name in ("quora-dev.csv", "sts-dev.csv"):
            lines = [lines[0]] + ["\t".join([*f[:2], f[3], f[2], *f[4:]]) for f in (line.split("\t") for line in lines[1:])]
        (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.parametrize("both_orders", [True, False])
def test_both_orders_make_pair_predictions_symmetric(tiny, tmp_path, both_orders):
    """With --eval_both_orders a pair's prediction is the mean of the encoder's readings of (a, b) and
    (b, a), so a dev file with its sentences exchanged gets the same predictions; a joint encoder alone
    reads them in order (a random tiny model's outputs differ). Training batches carry one order."""
    flag = "--eval_both_orders" if both_orders else "--no-eval_both_orders"
    swapped_dir = swapped_pairs_copy(tiny["data"], tmp_path / "swapped")
    outputs = []
    for data_dir in (tiny["data"], swapped_dir):
        run = make_run(tiny, flag, "--data_dir", data_dir)
        torch.manual_seed(0)
        run.model = build_model(run.cfg)  # the same random weights for both files
        _, predictions = run_evaluation(run.model, run.data["dev"], run.device, run.amp_context, 16)
        outputs.append(predictions)
        assert "swapped" not in run.train_sets["para"].collate([0, 1])
        assert ("swapped" in run.data["dev"]["para"].collate([0])) == both_orders
    for task in ("para", "sts"):
        same = np.allclose(outputs[0][task].outputs, outputs[1][task].outputs, atol=1e-5)
        assert same == both_orders, task
    assert np.array_equal(outputs[0]["sst"].outputs, outputs[1]["sst"].outputs)
