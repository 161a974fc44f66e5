"""Loading, validation, batching and task scheduling, on tiny CSVs that imitate the course files' quirks."""
import logging
import math
import os
from collections import Counter

import pytest
import torch

from datasets import (DataError, RawSplit, TaskBatchIterator, TaskDataset, default_num_batches,
                      epoch_task_schedule, length_bucketed_batches, load_task_split, pal_alpha,
                      padding_efficiency, random_batches, sequential_batches, task_sampling_probs)
from tasks import TASKS
from tokenizer import BertTokenizer

REAL_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")

SST_TRAIN = ("\tid\tsentence\tsentiment\n"
             "0\ts0\t It 's a good film .\t3\n"
             "1\ts1\t A bad , bad film\t0\n"
             "2\ts2\t good\t4\n")
# Quora quirks: the course's doubled quotes inside quoted fields, and quoting in the second column.
PARA_DEV = ("\tid\tsentence1\tsentence2\tis_duplicate\n"
            '318737\tp0\t"""Which is correct: Do I need """"the"""" here?"""\tGrammar: what errors?\t0.0\n'
            '12\tp1\tIs it good?\t"Is it ""good""?"\t1.0\n')
STS_TRAIN = ("\tid\tsentence1\tsentence2\tsimilarity\n"
             "5739\tt0\tUN chief welcomes elections\tUN chief condemns attack\t1.0\n"
             "7729\tt1\tTwo dogs play .\tTwo dogs are playing .\t4.6\n")
# The test-student files' shifted header: an extra float column before `id`.
SST_TEST = ("0\t\tid\tsentence\n"
            "1\t0.0\tx0\t Effective but too-tepid biopic\n"
            "2\t1.0\tx1\t If you like fun , go .\n")


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def tokenizer(tmp_path):
    """A BERT tokenizer on a 13-word vocabulary: every other word is [UNK], one token per word."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "is", "it", "?", "."]
    return BertTokenizer(write(tmp_path, "vocab.txt", "\n".join(words) + "\n"))


# ----------------------------------------------------------------------------- loading

def test_loads_quoted_fields_and_strips_spaces(tmp_path):
    write(tmp_path, "ids-sst-train.csv", SST_TRAIN)
    write(tmp_path, "quora-dev.csv", PARA_DEV)
    write(tmp_path, "sts-train.csv", STS_TRAIN)

    sst = load_task_split(TASKS["sst"], "train", str(tmp_path))
    assert sst.ids == ["s0", "s1", "s2"]
    assert sst.texts == ["It 's a good film .", "A bad , bad film", "good"]
    assert sst.pair_texts is None and sst.labels == [3.0, 0.0, 4.0]

    para = load_task_split(TASKS["para"], "dev", str(tmp_path))
    # One level of CSV quoting removed, as the course's csv.DictReader reads these fields.
    assert para.texts == ['"Which is correct: Do I need ""the"" here?"', "Is it good?"]
    assert para.pair_texts == ["Grammar: what errors?", 'Is it "good"?']
    assert para.labels == [0.0, 1.0]

    sts = load_task_split(TASKS["sts"], "train", str(tmp_path))
    assert sts.labels == [1.0, 4.6]


def test_test_split_with_shifted_header_has_no_labels(tmp_path):
    write(tmp_path, "ids-sst-test-student.csv", SST_TEST)
    raw = load_task_split(TASKS["sst"], "test", str(tmp_path))
    assert raw.ids == ["x0", "x1"]
    assert raw.texts == ["Effective but too-tepid biopic", "If you like fun , go ."]
    assert raw.labels is None


@pytest.mark.parametrize("task, file_name, text, line, expected", [
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\ts3\tgood\n", 5, "expected 4 tab-separated fields"),
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\t \tgood\t1\n", 5, "empty 'id'"),
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\ts3\t  \t1\n", 5, "empty 'sentence'"),
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\ts3\tgood\tpositive\n", 5, "'positive' is not a number"),
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\ts3\tgood\t5\n", 5, "expected an integer from 0 to 4"),
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\ts3\tgood\t2.5\n", 5, "expected an integer from 0 to 4"),
    ("sst", "ids-sst-train.csv", SST_TRAIN + "3\ts3\tgood\tnan\n", 5, "'nan' is not valid"),
    ("para", "quora-dev.csv", PARA_DEV + "9\tp9\ta\tb\t2.0\n", 4, "expected an integer from 0 to 1"),
    ("sts", "sts-train.csv", STS_TRAIN + "9\tt9\ta\tb\t5.5\n", 4, "expected a number from 0 to 5"),
    ("sts", "sts-train.csv", STS_TRAIN + "9\tt9\ta\tb\t-0.1\n", 4, "expected a number from 0 to 5"),
    # A quoted field spanning lines 4-5: a bad row is reported at its first line, and the next row is line 6.
    ("sts", "sts-train.csv", STS_TRAIN + '8\tt8\t"two\nlines"\tb\tx\n', 4, "not a number"),
    ("sts", "sts-train.csv", STS_TRAIN + '8\tt8\t"two\nlines"\tb\t1.0\n9\tt9\ta\tb\tx\n', 6, "not a number"),
    ("sst", "ids-sst-train.csv", "\tid\ttext\tsentiment\n0\ts0\tgood\t1\n", 1, "missing column(s) ['sentence']"),
])
def test_bad_rows_name_file_line_and_expectation(tmp_path, task, file_name, text, line, expected):
    path = write(tmp_path, file_name, text)
    with pytest.raises(DataError) as error:
        load_task_split(TASKS[task], "train" if "train" in file_name else "dev", str(tmp_path))
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert expected in str(error.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_byte_that_is_not_utf8_is_reported_at_its_line(tmp_path, bom):
    """The text reader decodes 8 KB ahead of the rows it hands out: the line must come from the bytes."""
    rows = [f"{i}\ts{i}\tsentence number {i} of a file long enough to be read in several chunks\t1\n".encode()
            for i in range(400)]
    rows[249] = rows[249].replace(b"sentence", b"sent\xe9nce")  # Latin-1, not UTF-8: line 251
    (tmp_path / "ids-sst-train.csv").write_bytes(bom + b"\tid\tsentence\tsentiment\n" + b"".join(rows))
    with pytest.raises(DataError, match=r"ids-sst-train\.csv:251: not UTF-8 text \(invalid continuation byte"):
        load_task_split(TASKS["sst"], "train", str(tmp_path))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"ids-sst-dev\.csv: file not found"):
        load_task_split(TASKS["sst"], "dev", str(tmp_path))


def test_empty_labels_are_skipped_with_one_warning(tmp_path, caplog):
    # As in the real Quora files: a broken quote leaves the rest of the row, label included, empty.
    path = write(tmp_path, "quora-dev.csv", PARA_DEV + '5\tp5\t"""Which RO purifier?"\t\t\n'
                                                        "6\tp6\tIs it?\tIt is\t\n"
                                                        "7\tp7\tIs it?\tIt is\t1.0\n")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        raw = load_task_split(TASKS["para"], "dev", str(tmp_path))
    assert raw.ids == ["p0", "p1", "p7"]
    assert len(caplog.records) == 1
    assert f"{path}: skipped 2 row(s) with an empty 'is_duplicate' label (line 4, 5)" in caplog.text


def test_max_examples_is_a_fixed_subset_in_file_order(tmp_path):
    rows = "".join(f"{i}\ts{i}\tfilm {i}\t{i % 5}\n" for i in range(40))
    write(tmp_path, "ids-sst-train.csv", "\tid\tsentence\tsentiment\n" + rows)
    first = load_task_split(TASKS["sst"], "train", str(tmp_path), max_examples=7)
    again = load_task_split(TASKS["sst"], "train", str(tmp_path), max_examples=7)
    assert first == again and len(first.ids) == 7
    positions = [int(i[1:]) for i in first.ids]
    assert positions == sorted(positions) and positions != list(range(7))  # spread out, not the head
    assert first.labels == [p % 5 for p in positions]


def test_real_course_files_row_counts():
    if not os.path.isfile(os.path.join(REAL_DATA_DIR, "quora-dev.csv")):
        pytest.skip("course data not present")
    counts = {("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test"): 2210,
              ("para", "train"): 14139 - 2, ("para", "dev"): 20214 - 2, ("para", "test"): 998,
              ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test"): 1725,
              ("cfimdb", "train"): 1707, ("cfimdb", "dev"): 245, ("cfimdb", "test"): 488}
    for (task, split), count in counts.items():
        raw = load_task_split(TASKS[task], split, REAL_DATA_DIR)
        assert len(raw.ids) == count, (task, split)
        assert (raw.labels is None) == (split == "test")
    para_dev = load_task_split(TASKS["para"], "dev", REAL_DATA_DIR)
    assert para_dev.ids[1] == "318658e273ac78f3b1e957b8b"
    assert para_dev.texts[1].endswith('Do I need ""the"" here?"')
    assert para_dev.pair_texts[1].startswith("Grammar: What are the most common")


# ----------------------------------------------------------------------------- dataset and collate

def test_collate_pads_to_the_longest_in_the_batch(tokenizer):
    raw = RawSplit(path="x", ids=["a0", "a1", "a2"], texts=["good", "a good film", "a bad bad bad film ."],
                   pair_texts=None, labels=[4.0, 3.0, 0.0])
    dataset = TaskDataset(TASKS["sst"], raw, tokenizer)
    assert dataset.lengths == [3, 5, 8]
    batch = dataset.collate([1, 0])
    assert batch["input_ids"].shape == (2, 5)  # longest of the batch, not of the dataset
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [3, 4]
    assert batch["ids"] == ["a1", "a0"]


def test_pairs_are_joint_by_default_and_separate_when_siamese(tokenizer):
    raw = RawSplit(path="x", ids=["q0", "q1"], texts=["is it good ?", "film"], pair_texts=["good", "a bad film"],
                   labels=[1.0, 0.0])
    joint = TaskDataset(TASKS["para"], raw, tokenizer).collate([0, 1])
    assert joint["input_ids"].shape == (2, 8)  # [CLS] is it good ? [SEP] good [SEP]
    assert joint["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert joint["labels"].dtype == torch.float32

    siamese = TaskDataset(TASKS["para"], raw, tokenizer, siamese=True)
    assert siamese.lengths == [6 + 3, 3 + 5]
    batch = siamese.collate([0, 1])
    assert batch["input_ids_1"].shape == (2, 6) and batch["input_ids_2"].shape == (2, 5)
    assert batch["attention_mask_2"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert "input_ids" not in batch


def test_both_orders_carry_each_pair_also_as_b_a(tokenizer):
    raw = RawSplit(path="x", ids=["q0", "q1"], texts=["is it good ?", "film"], pair_texts=["good", "a bad film"],
                   labels=[1.0, 0.0])
    batch = TaskDataset(TASKS["para"], raw, tokenizer, both_orders=True).collate([0, 1])
    swapped_raw = RawSplit(path="x", ids=raw.ids, texts=raw.pair_texts, pair_texts=raw.texts, labels=raw.labels)
    expected = TaskDataset(TASKS["para"], swapped_raw, tokenizer).collate([0, 1])
    assert set(batch["swapped"]) == {"input_ids", "token_type_ids", "attention_mask"}
    for key, value in batch["swapped"].items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(batch["input_ids"], TaskDataset(TASKS["para"], raw, tokenizer).collate([0, 1])["input_ids"])
    assert "swapped" not in TaskDataset(TASKS["para"], raw, tokenizer).collate([0, 1])
    with pytest.raises(ValueError, match="symmetric pair task"):
        TaskDataset(TASKS["para"], raw, tokenizer, siamese=True, both_orders=True)
    with pytest.raises(ValueError, match="symmetric pair task"):
        TaskDataset(TASKS["sst"], RawSplit("x", ["s"], ["good"], None, [1]), tokenizer, both_orders=True)


def test_test_split_batches_have_no_labels(tokenizer):
    raw = RawSplit(path="x", ids=["x0"], texts=["good"], pair_texts=None, labels=None)
    assert "labels" not in TaskDataset(TASKS["sst"], raw, tokenizer).collate([0])


# ----------------------------------------------------------------------------- batch orders

def test_bucketed_batches_cover_every_index_once_with_less_padding():
    lengths = torch.randint(1, 100, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(1), bucket_chunks=5)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert [len(b) for b in batches].count(16) == len(batches) - 1  # only 1000 % 16 = 8 left over
    assert batches == length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(1), bucket_chunks=5)
    shuffled = random_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert padding_efficiency(lengths, batches) > padding_efficiency(lengths, shuffled) + 0.3


def test_sequential_batches_longest_first_and_complete():
    lengths = [3, 9, 1, 7, 5]
    assert sequential_batches(lengths, 2) == [[1, 3], [4, 0], [2]]


def test_padding_efficiency_by_hand():
    # Batch [3, 1] pads to 2 x 3 = 6 tokens for 4 real; batch [2] is 2 for 2: 6 / 8.
    assert padding_efficiency([3, 1, 2], [[0, 1], [2]]) == pytest.approx(6 / 8)


def test_batch_iterator_resumes_exactly():
    lengths = list(range(1, 24))
    stream = TaskBatchIterator(lengths, 5, torch.Generator().manual_seed(3))
    for _ in range(7):  # into the second pass (5 batches per pass)
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(9)]  # crosses into the third pass
    assert stream.epoch == 3  # 16 batches: three full passes of 5, then one more

    resumed = TaskBatchIterator(lengths, 5, torch.Generator().manual_seed(999))
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and resumed.position == 2
    assert [next(resumed) for _ in range(9)] == expected

    with pytest.raises(ValueError, match="batch_size"):
        TaskBatchIterator(lengths, 4, torch.Generator()).load_state_dict(state)


def test_batch_iterator_passes_differ_and_each_covers_the_data():
    stream = TaskBatchIterator(list(range(10)), 4, torch.Generator().manual_seed(0), bucketed=False)
    first = [next(stream) for _ in range(3)]
    second = [next(stream) for _ in range(3)]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(10))
    assert first != second


# ----------------------------------------------------------------------------- task scheduling

SIZES = {"sst": 8544, "para": 14137, "sts": 6040}


def test_pal_alpha_anneals_from_one_to_point_two():
    assert pal_alpha(0, 10) == 1.0
    assert pal_alpha(9, 10) == pytest.approx(0.2)
    assert pal_alpha(4, 9) == pytest.approx(0.6)  # e = 5 of E = 9: 1 - 0.8 * 4 / 8
    assert pal_alpha(0, 1) == 1.0
    with pytest.raises(ValueError):
        pal_alpha(10, 10)


def test_sampling_probs_follow_the_formulas():
    total = sum(SIZES.values())
    assert task_sampling_probs("random", SIZES, 0, 3) == pytest.approx({t: 1 / 3 for t in SIZES})
    proportional = {t: n / total for t, n in SIZES.items()}
    assert task_sampling_probs("proportional", SIZES, 0, 3) == pytest.approx(proportional)
    assert task_sampling_probs("pal", SIZES, 0, 3) == pytest.approx(proportional)  # alpha = 1 in the first epoch
    root_total = sum(n ** 0.2 for n in SIZES.values())
    last_epoch = {t: n ** 0.2 / root_total for t, n in SIZES.items()}  # alpha = 0.2
    assert task_sampling_probs("pal", SIZES, 2, 3) == pytest.approx(last_epoch)
    with pytest.raises(ValueError, match="does not sample"):
        task_sampling_probs("round_robin", SIZES, 0, 3)


@pytest.mark.parametrize("scheduler, epoch", [("random", 0), ("proportional", 0), ("pal", 4)])
def test_sampled_schedule_frequencies_match_probs(scheduler, epoch):
    draws = 20_000
    schedule = epoch_task_schedule(scheduler, SIZES, draws, torch.Generator().manual_seed(0), epoch, 5)
    counts = Counter(schedule)
    for task, p in task_sampling_probs(scheduler, SIZES, epoch, 5).items():
        assert abs(counts[task] / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)  # 4 standard errors


def test_round_robin_and_sequential_schedules():
    generator = torch.Generator()
    assert epoch_task_schedule("round_robin", SIZES, 7, generator) == ["sst", "para", "sts"] * 2 + ["sst"]
    assert epoch_task_schedule("sequential", SIZES, 8, generator) == ["sst"] * 3 + ["para"] * 3 + ["sts"] * 2
    with pytest.raises(ValueError, match="unknown scheduler"):
        epoch_task_schedule("annealed", SIZES, 8, generator)


def test_default_num_batches_sees_the_smallest_task_once():
    assert default_num_batches(SIZES, 32) == 3 * math.ceil(6040 / 32)
