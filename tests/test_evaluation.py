"""Metrics by hand, the evaluation loop's ordering and the course's prediction-file format."""
import math
import os

import numpy as np
import pytest
import torch

from datasets import RawSplit, TaskDataset
from evaluation import accuracy, confusion_matrix, evaluate, overall_score, pearson, write_predictions
from tasks import TASKS
from tokenizer import BertTokenizer


@pytest.fixture
def tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return BertTokenizer(str(vocab))


def test_accuracy_by_hand():
    assert accuracy([0, 2, 1, 4], [0, 2, 3, 4]) == 0.75
    assert accuracy(np.array([1.0, 0.0]), torch.tensor([1.0, 1.0]).numpy()) == 0.5


def test_pearson_by_hand():
    # x = [1, 2, 3], y = [1, 2, 4]: deviations [-1, 0, 1] and [-4/3, -1/3, 5/3],
    # r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84).
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    assert pearson([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert pearson([2.5, 2.5, 2.5], [1, 2, 4]) == 0.0  # constant predictions: documented 0.0, not nan
    with pytest.raises(ValueError, match="equal, non-zero numbers"):
        pearson([1, 2], [1, 2, 3])


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(predictions=[0, 1, 1, 2], labels=[0, 0, 1, 2], num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_overall_score_is_the_course_formula_and_generalises():
    metrics = {"sst": {"accuracy": 0.5}, "para": {"accuracy": 0.8}, "sts": {"pearson": 0.6}}
    assert overall_score(metrics) == pytest.approx((0.5 + 0.8 + (0.6 + 1) / 2) / 3)
    assert overall_score({**metrics, "cfimdb": {"accuracy": 0.9}}) == pytest.approx((0.5 + 0.8 + 0.8 + 0.9) / 4)
    with pytest.raises(ValueError, match="'accuracy' or 'pearson'"):
        overall_score({"sst": {"loss": 1.0}})


def test_evaluate_restores_file_order_and_scores(tokenizer):
    # Lengths differ, so the longest-first batches visit the examples out of file order.
    texts = ["good", "a bad bad film", "film", "a good film", "bad"]
    sst = TaskDataset(TASKS["sst"], RawSplit("x", ["s0", "s1", "s2", "s3", "s4"], texts, None,
                                             [4.0, 0.0, 2.0, 3.0, 1.0]), tokenizer)
    sts = TaskDataset(TASKS["sts"], RawSplit("y", ["t0", "t1", "t2"], ["good", "bad", "film"],
                                             ["good film", "a", "a film"], [5.0, 0.4, 2.5]), tokenizer)
    test = TaskDataset(TASKS["para"], RawSplit("z", ["q0", "q1"], ["good", "bad film"], ["a", "bad"], None),
                       tokenizer)
    answers = {"s0": 4, "s1": 0, "s2": 1, "s3": 3, "s4": 2,  # 3 of 5 right
               "t0": 4.5, "t1": 0.5, "t2": 2.0, "q0": 1.0, "q1": 0.0}
    seen = []

    def predict_fn(task, batch):
        seen.append((task, batch["ids"]))
        dtype = torch.long if task == "sst" else torch.float32
        values = torch.tensor([answers[i] for i in batch["ids"]], dtype=dtype)
        return values, values.float().unsqueeze(-1) + torch.tensor([0.0, 0.5])  # (B, 2) outputs

    metrics, predictions = evaluate(predict_fn, {"sst": sst, "sts": sts, "para": test}, batch_size=2)
    assert seen[0] == ("sst", ["s1", "s3"])  # longest first
    assert predictions["sst"][0] == ["s0", "s1", "s2", "s3", "s4"]
    assert predictions["sst"][1].tolist() == [4, 0, 1, 3, 2] and predictions["sst"][1].dtype == np.int64
    assert predictions["sts"][1].tolist() == pytest.approx([4.5, 0.5, 2.0])
    assert predictions["para"][1].tolist() == [1.0, 0.0] and predictions["para"][1].dtype == np.float32
    assert predictions["sst"].outputs.tolist() == [[4, 4.5], [0, 0.5], [1, 1.5], [3, 3.5], [2, 2.5]]
    assert predictions["sst"].outputs.dtype == np.float32
    sts_r = pearson([4.5, 0.5, 2.0], [5.0, 0.4, 2.5])
    assert metrics == {"sst": {"accuracy": 0.6}, "sts": {"pearson": pytest.approx(sts_r)}}  # no labels, no para


def test_evaluate_rejects_logits_and_wrong_shapes(tokenizer):
    sst = TaskDataset(TASKS["sst"], RawSplit("x", ["s0", "s1"], ["good", "bad"], None, [4.0, 0.0]), tokenizer)
    with pytest.raises(ValueError, match="class indices 0..4"):
        evaluate(lambda task, batch: (torch.tensor([0.3, -1.2]), torch.zeros(2, 5)), {"sst": sst}, batch_size=2)
    with pytest.raises(ValueError, match=r"expected \(2,\) predictions"):
        evaluate(lambda task, batch: (torch.zeros(2, 5), torch.zeros(2, 5)), {"sst": sst}, batch_size=2)
    with pytest.raises(ValueError, match="outputs with 2 rows"):
        evaluate(lambda task, batch: (torch.zeros(2), torch.zeros(5)), {"sst": sst}, batch_size=2)


def test_prediction_file_is_the_course_format(tmp_path):
    path = tmp_path / "predictions" / "sts-dev-output.csv"
    values = torch.tensor([0.46074217557907104, 3.0]).numpy()  # float32, as the model outputs them
    write_predictions(str(path), ["876d0172eef5db7776e39c5de", "e8336dc096adaf2de4e8e9425"], values,
                      TASKS["sts"].prediction_header)
    # The same text the course's evaluation.py writes for these float32 values.
    assert path.read_text() == ("id \t Predicted_Similiary \n"
                                "876d0172eef5db7776e39c5de , 0.46074217557907104 \n"
                                "e8336dc096adaf2de4e8e9425 , 3.0 \n")
    write_predictions(str(path), ["a", "b"], np.array([3, 0], dtype=np.int64), TASKS["sst"].prediction_header)
    assert path.read_text() == "id \t Predicted_Sentiment \na , 3 \nb , 0 \n"
    assert os.listdir(path.parent) == ["sts-dev-output.csv"]  # no temporary file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "para-dev-output.csv"
    write_predictions(str(path), ["a"], np.array([1.0], dtype=np.float32), TASKS["para"].prediction_header)
    old_text = path.read_text()

    class Unprintable:
        def __format__(self, spec):
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        write_predictions(str(path), ["a", "b", "c"], [1.0, 0.0, Unprintable()], TASKS["para"].prediction_header)
    assert path.read_text() == old_text == "id \t Predicted_Is_Paraphrase \na , 1.0 \n"
    assert os.listdir(tmp_path) == ["para-dev-output.csv"]
