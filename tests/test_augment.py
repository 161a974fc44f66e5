"""Augmentation (augment.py) and long-input filtering: WordNet read from a tiny database in WordNet's own
format, each EDA operation, the augmented split, --drop_longest, and the run's data end to end."""
import random

import pytest
import torch

import augment
from datasets import RawSplit, without_longest
from errors import InputError
from flags import parse_args
from model import build_model
from pipeline import load_datasets
from state import Run
from tasks import TASKS
from tokenizer import BertTokenizer
from tests.fixtures import write_course_data, write_tiny_bert

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by\n"
# wndb(5) lines: offset, lexicographer file, type, word count (hex), word lex_id ..., pointers | gloss
TINY_WORDNET = {
    "data.noun": ["00000001 06 n 03 movie 0 film 0 motion_picture 0 000 | a form of entertainment",
                  "00000002 06 n 02 film 1 photographic_film 0 000 | a thin coating",
                  "00000003 05 n 02 goose 0 anser-anser 0 000 | web-footed bird",
                  "00000004 05 n 02 dog 0 canis_familiaris 0 000 | a domestic animal",
                  "00000005 05 n 02 c 0 c++ 0 000 | a language (not letters only)",
                  "00000006 05 n 02 a 0 vitamin_a 0 000 | a vitamin (EDA must not take the article for it)"],
    "data.verb": ["00000011 30 v 02 run 0 scarper 0 000 | move fast"],
    "data.adj": ["00000021 00 a 02 good(a) 0 beneficial 0 000 | having desirable qualities",
                 "00000022 00 s 02 great(p) 0 good(a) 0 000 | very good"],
    "data.adv": [],
    "noun.exc": ["geese goose"],
    "verb.exc": ["ran run"],
}


@pytest.fixture(scope="module")
def wordnet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wordnet")
    for name, lines in TINY_WORDNET.items():
        (folder / name).write_text(LICENCE + "".join(line + "  \n" for line in lines))
    return str(folder)


@pytest.fixture(scope="module")
def wordnet(wordnet_dir):
    return augment.WordNet(wordnet_dir)


def test_synonyms_follow_wordnet_senses_and_morphology(wordnet):
    assert set(wordnet.synonyms("film")) == {"movie", "motion picture", "photographic film"}  # both senses
    assert set(wordnet.synonyms("movies")) == {"movie", "film", "motion picture"}  # morphy: movies -> movie
    assert set(wordnet.synonyms("geese")) == {"goose", "anser anser"}  # the exception list
    assert set(wordnet.synonyms("ran")) == {"run", "scarper"}
    assert set(wordnet.synonyms("Good")) == {"beneficial", "great"}  # markers like (a) stripped, lower-cased
    assert wordnet.synonyms("c") == []  # "c++" is not letters only
    assert wordnet.synonyms("table") == []


def test_a_broken_database_line_names_file_and_line(tmp_path):
    for name, lines in TINY_WORDNET.items():
        (tmp_path / name).write_text(LICENCE + "".join(line + "\n" for line in lines))
    (tmp_path / "data.verb").write_text(LICENCE + "00000011 30 v zz run 0\n")
    with pytest.raises(InputError, match=r"data\.verb:2: not a WordNet data line"):
        augment.WordNet(str(tmp_path))


def test_synonym_replacement_replaces_n_content_words_everywhere(wordnet):
    words = "a dog saw a film and a dog ran".split()
    out = augment.synonym_replacement(words, 1, wordnet, random.Random(0))
    changed = {w for w in words if w not in out}
    assert len(changed) == 1 and changed <= {"dog", "film", "ran"}  # never a stop word ("a", "and")
    every = augment.synonym_replacement(words, 4, wordnet, random.Random(0))
    assert not {"dog", "film", "ran"} & set(every)  # every occurrence replaced
    assert "vitamin" not in every and every.count("a") == 3


def test_random_insertion_adds_synonyms_of_the_sentence_words(wordnet):
    words = "a good dog".split()
    out = augment.random_insertion(words, 2, wordnet, random.Random(1))
    inserted = list(out)
    for w in words:
        inserted.remove(w)
    allowed = {part for word in words for syn in wordnet.synonyms(word) for part in syn.split()}
    assert 2 <= len(inserted) and set(inserted) <= allowed


def test_random_swap_and_deletion():
    words = "one two three four five six seven eight nine ten".split()
    swapped = augment.random_swap(words, 2, random.Random(0))
    assert sorted(swapped) == sorted(words) and swapped != words
    kept = [len(augment.random_deletion(words, 0.3, random.Random(seed))) for seed in range(200)]
    assert 6.5 < sum(kept) / len(kept) < 7.5  # each word kept with probability 0.7
    assert augment.random_deletion(["alone"], 0.9, random.Random(0)) == ["alone"]
    assert len(augment.random_deletion(words, 0.999999, random.Random(0))) == 1  # never empty


def test_eda_cycles_the_four_operations_and_is_seeded(wordnet):
    sentence = "the good dog ran after the film ."
    copies = augment.eda_sentences(sentence, 0.1, 8, wordnet, random.Random(3))
    assert len(copies) == 8 and copies == augment.eda_sentences(sentence, 0.1, 8, wordnet, random.Random(3))
    words = sentence.split()
    assert len(copies[0].split()) >= len(words) and copies[0] != sentence   # SR (a synonym may be two words)
    assert len(copies[1].split()) > len(words)                              # RI
    assert sorted(copies[2].split()) == sorted(words) and copies[2] != sentence  # RS
    assert len(copies[3].split()) <= len(words)                             # RD


def test_augment_split_keeps_labels_and_counts_sources(wordnet):
    raw = RawSplit("x", ["a", "b"], ["the good dog", "a film ran"], None, [4.0, 1.0])
    out, added = augment.augment_split(raw, TASKS["sst"], ("eda",), 0.1, 3, seed=0, wordnet=wordnet)
    assert added == {"eda": 6} and len(out.ids) == 8 and out.num_sources == 2
    assert out.ids[:2] == ["a", "b"] and out.ids[2:] == ["a"] * 3 + ["b"] * 3
    assert out.labels == [4.0, 1.0] + [4.0] * 3 + [1.0] * 3
    pairs = RawSplit("x", ["p", "q"], ["a dog", "is it"], ["the film", "so"], [1.0, 0.0])
    swapped, added = augment.augment_split(pairs, TASKS["para"], ("swap",), 0.1, 1, seed=0)
    assert added == {"swap": 2} and swapped.num_sources == 2
    assert list(zip(swapped.texts, swapped.pair_texts))[2:] == [("the film", "a dog"), ("so", "is it")]
    assert swapped.labels == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="symmetric"):
        augment.augment_split(raw, TASKS["sst"], ("swap",), 0.1, 1, seed=0)


def test_without_longest_drops_the_longest_fraction_in_file_order():
    raw = RawSplit("x", [str(i) for i in range(10)], [f"t{i}" for i in range(10)], None, [0.0] * 10)
    lengths = [5, 9, 3, 9, 1, 2, 8, 4, 6, 7]
    kept, longest = without_longest(raw, lengths, 0.2)
    assert kept.ids == ["0", "2", "4", "5", "6", "7", "8", "9"] and longest == 8  # both 9s gone
    kept, longest = without_longest(raw, lengths, 0.15)  # floor(1.5) = 1: the later of the tied 9s
    assert kept.ids == [str(i) for i in range(10) if i != 3] and longest == 9
    assert without_longest(raw, lengths, 0.0)[0].ids == raw.ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"data": write_course_data(root / "data", rows=40), "bert": write_tiny_bert(root / "bert")}


def tiny_config(tiny, *extra):
    return parse_args(["--data_dir", tiny["data"], "--bert_path", tiny["bert"], *extra])


def test_run_data_is_filtered_then_augmented_and_the_schedule_counts_original_rows(tiny, wordnet_dir, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(augment, "WORDNET_DIRS", (wordnet_dir,))
    cfg = tiny_config(tiny, "--augment", "eda,swap", "--eda_num_aug", "2", "--drop_longest", "0.1")
    data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
    printed = capsys.readouterr().out
    assert "drop_longest: sst dropped 4 of 40 training rows" in printed
    assert "augment: sst 36 training rows + 72 eda = 108" in printed
    assert "augment: para 36 training rows + 36 swap = 72" in printed
    train = data["train"]
    assert (len(train["sst"]), len(train["para"]), len(train["sts"])) == (108, 72, 72)
    assert [len(data[s]["sst"]) for s in ("dev", "test")] == [40, 40]  # never dev or test
    run = Run(cfg, build_model(cfg), data, torch.device("cpu"), "none")
    assert run.sizes == {"sst": 36, "para": 36, "sts": 36}
    again = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))["train"]["sst"]
    assert again.encodings[0][1] == train["sst"].encodings[0][1]  # seeded: the same rows every time


def test_eda_without_wordnet_stops_before_training_saying_how_to_get_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(augment, "WORDNET_DIRS", (str(tmp_path / "nowhere"),))
    cfg = tiny_config(tiny, "--augment", "eda")
    with pytest.raises(InputError, match="wordnet-base"):
        load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))


@pytest.mark.parametrize("flags, message", [
    (["--augment", "mixup"], "unknown method"),
    (["--augment", "swap", "--tasks", "sst"], "symmetric"),
    (["--augment", "swap", "--augment_tasks", "sst"], "symmetric"),
    (["--augment_tasks", "sst"], "needs --augment"),
    (["--augment", "eda", "--augment_tasks", "cfimdb"], "not among --tasks"),
    (["--drop_longest", "1"], "drop_longest"),
    (["--augment", "eda", "--eda_alpha", "0"], "eda_alpha"),
])
def test_impossible_augmentation_settings_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not any(augment.os.path.isfile(augment.os.path.join(d, "data.noun"))
                            for d in augment.WORDNET_DIRS), reason="WordNet 3.0 not installed (./setup.sh)")
def test_the_real_wordnet():
    wordnet = augment.WordNet(augment.find_wordnet())
    assert {"film", "picture", "motion picture"} <= set(wordnet.synonyms("movies"))
    assert "run" in wordnet.synonyms("ran") and "beneficial" in wordnet.synonyms("good")
    assert sum(len(by_lemma) for by_lemma in wordnet.lemma_synsets.values()) > 140_000  # WordNet 3.0: 155k
