"""Shared test set-up: run the suite on a small, fixed number of threads so results and timings
do not depend on how many other processes share the machine."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from tests.fixtures import write_course_data, write_embedded_model_layers, write_tiny_bert  # noqa: E402 (after the path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Course-format data (24 rows per split) and a tiny random BERT, once per test module."""
    root = tmp_path_factory.mktemp("tiny")
    return {"data": write_course_data(root / "data"), "bert": write_tiny_bert(root / "bert")}


@pytest.fixture(scope="module")
def minilm_two_layers(tmp_path_factory) -> str:
    """MiniLM's embeddings and first two layers (tests/fixtures.write_embedded_model_layers), once per module."""
    return write_embedded_model_layers(tmp_path_factory.mktemp("minilm2"), layers=2)
