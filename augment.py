"""Training-data augmentation, made once before training from the training split alone.

- `eda_sentences`: EDA (Wei & Zou, 2019, "EDA: Easy Data Augmentation Techniques for Boosting
  Performance on Text Classification Tasks", Sec. 2): synonym replacement, random insertion, random
  swap and random deletion, each changing about alpha * (number of words) words.
- `WordNet`: the synonyms EDA draws, read offline from the WordNet 3.0 database files (Debian's
  `wordnet-base` package; the line format is wndb(5)), with WordNet's own morphology (morphy(7)).
- `augment_split`: the augmented copy of one task's training rows (EDA copies, swapped pairs).

Everything is drawn from one `random.Random(seed)`: the same seed gives the same rows.
"""
import os
import random
import sys
from dataclasses import replace

from errors import InputError
from datasets import RawSplit
from tasks import TaskSpec

# Where `setup.sh` puts the database without root (dpkg -x into the venv), then Debian's own place.
WORDNET_DIRS = (os.path.join(sys.prefix, "share", "wordnet"), "/usr/share/wordnet")
WORDNET_POS = ("noun", "verb", "adj", "adv")
# morphy(7): suffix rules tried per part of speech when a word is not a lemma itself.
MORPHY_RULES = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
# Function words EDA never replaces or inserts synonyms for (they carry little meaning and WordNet
# gives odd senses for many of them: "a" -> "vitamin a").
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
""".split())


class WordNet:
    """Synonyms from a WordNet 3.0 database folder (data.noun, ..., noun.exc, ...).

    `synonyms(word)`: every other lemma of every synset the word (or its base form) belongs to, in any
    part of speech, lower-cased with "_" and "-" as spaces: what EDA's reference code takes from NLTK."""

    def __init__(self, folder: str):
        self.folder = folder
        self.lemma_synsets: dict[str, dict[str, list[int]]] = {}   # pos -> lemma -> synset numbers
        self.synset_words: list[tuple[str, ...]] = []
        self.exceptions: dict[str, dict[str, list[str]]] = {}      # pos -> inflected form -> base forms
        self._synonyms: dict[str, list[str]] = {}                   # cache: EDA asks for the same words often
        for pos in WORDNET_POS:
            self.lemma_synsets[pos] = self._read_data(pos)
            self.exceptions[pos] = self._read_exceptions(pos)

    def _read_data(self, pos: str) -> dict[str, list[int]]:
        path = os.path.join(self.folder, f"data.{pos}")
        lemmas: dict[str, list[int]] = {}
        try:
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if line.startswith("  "):  # the licence header
                        continue
                    # synset_offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...
                    fields = line.split(" ", 4 + 2 * 1000)
                    try:
                        count = int(fields[3], 16)
                        words = tuple(fields[4 + 2 * k].split("(")[0].lower() for k in range(count))
                    except (IndexError, ValueError):
                        raise InputError(f"{path}:{line_number}: not a WordNet data line (wndb(5): offset, "
                                         f"lexicographer file, type, word count in hex, words)") from None
                    number = len(self.synset_words)
                    self.synset_words.append(words)
                    for word in words:
                        lemmas.setdefault(word, []).append(number)
        except FileNotFoundError:
            raise InputError(f"{path}: not found (a WordNet 3.0 database folder has data.noun, data.verb, "
                             f"data.adj, data.adv and the *.exc files)") from None
        return lemmas

    def _read_exceptions(self, pos: str) -> dict[str, list[str]]:
        path = os.path.join(self.folder, f"{pos}.exc")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return {fields[0]: fields[1:] for fields in (line.split() for line in f) if len(fields) > 1}

    def base_forms(self, word: str, pos: str) -> list[str]:
        """morphy(7): the word itself if it is a lemma, its listed exceptions, else the suffix rules'
        results that are lemmas ("movies" -> ["movie"])."""
        lemmas = self.lemma_synsets[pos]
        if word in self.exceptions[pos]:
            candidates = [word, *self.exceptions[pos][word]]
        else:
            candidates = [word] + [word[:-len(old)] + new for old, new in MORPHY_RULES[pos] if word.endswith(old)]
        return list(dict.fromkeys(form for form in candidates if form in lemmas))

    def synonyms(self, word: str) -> list[str]:
        word = word.lower()
        if word in self._synonyms:
            return self._synonyms[word]
        found = {}
        for pos in WORDNET_POS:
            for form in self.base_forms(word, pos):
                for number in self.lemma_synsets[pos][form]:
                    for lemma in self.synset_words[number]:
                        synonym = lemma.replace("_", " ").replace("-", " ")
                        if synonym != word and all(c.isalpha() or c == " " for c in synonym):
                            found[synonym] = None
        self._synonyms[word] = list(found)
        return self._synonyms[word]


def find_wordnet() -> str:
    """The first WordNet database folder of WORDNET_DIRS, or an InputError saying how to get one."""
    for folder in WORDNET_DIRS:
        if os.path.isfile(os.path.join(folder, "data.noun")):
            return folder
    raise InputError(f"--augment eda needs the WordNet 3.0 database, not found in {' or '.join(WORDNET_DIRS)}: "
                     f"run ./setup.sh (it installs Debian's wordnet-base package, or unpacks it into the venv "
                     f"without root), or: apt-get install wordnet-base")


# ----------------------------------------------------------------------------- EDA (Wei & Zou 2019, Sec. 2)

def synonym_replacement(words: list[str], n: int, wordnet: WordNet, rng: random.Random) -> list[str]:
    """SR: n distinct non-stop words, in random order among those that have synonyms, each replaced
    (every occurrence) by a random synonym."""
    out = list(words)
    candidates = sorted({w for w in words if w.isalpha() and w.lower() not in STOP_WORDS})
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        synonyms = wordnet.synonyms(word)
        if synonyms:
            choice = rng.choice(synonyms)
            out = [choice if w == word else w for w in out]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(out).split(" ")  # a multi-word synonym becomes several words


def random_insertion(words: list[str], n: int, wordnet: WordNet, rng: random.Random) -> list[str]:
    """RI: n times, a random synonym of a random non-stop word inserted at a random position
    (up to 10 draws to find a word with synonyms, as the reference code)."""
    out = list(words)
    for _ in range(n):
        for _ in range(10):
            word = rng.choice(out)
            synonyms = wordnet.synonyms(word) if word.isalpha() and word.lower() not in STOP_WORDS else []
            if synonyms:
                out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms))
                break
    return " ".join(out).split(" ")


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """RS: n times, two random positions swapped."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """RD: each word removed with probability p; one random word is kept if all would go."""
    if len(words) < 2:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def eda_sentences(sentence: str, alpha: float, num_aug: int, wordnet: WordNet, rng: random.Random) -> list[str]:
    """`num_aug` augmented copies of `sentence` (the original not included): the four operations in
    turn (SR, RI, RS, RD, SR, ...), each with alpha as the paper's alpha_sr = alpha_ri = alpha_rs = p_rd,
    changing n = max(1, alpha * words) words. Words are the whitespace-separated tokens; punctuation
    tokens are kept and never replaced."""
    words = sentence.split()
    n = max(1, int(alpha * len(words)))
    operations = (lambda: synonym_replacement(words, n, wordnet, rng),
                  lambda: random_insertion(words, n, wordnet, rng),
                  lambda: random_swap(words, n, rng),
                  lambda: random_deletion(words, alpha, rng))
    return [" ".join(operations[k % 4]()) for k in range(num_aug)]


# ----------------------------------------------------------------------------- applying it to a split

def augment_split(raw: RawSplit, spec: TaskSpec, methods: tuple[str, ...], eda_alpha: float, eda_num_aug: int,
                  seed: int, wordnet: WordNet | None = None) -> tuple[RawSplit, dict[str, int]]:
    """The training rows followed by their augmented copies, and the number of rows each method added.

    "eda": `eda_num_aug` copies of each row (a pair task's two sentences edited independently);
    "swap": (a, b) -> (b, a) for a symmetric pair task, every row once (EDA copies included).
    The copies keep their row's id and label; `sources` stays the number of original rows."""
    rng = random.Random(seed)
    ids, texts, pairs = list(raw.ids), list(raw.texts), None if raw.pair_texts is None else list(raw.pair_texts)
    labels = list(raw.labels)
    added = {}
    if "eda" in methods:
        before = len(ids)
        for i in range(len(raw.ids)):
            copies = eda_sentences(raw.texts[i], eda_alpha, eda_num_aug, wordnet, rng)
            pair_copies = (None if pairs is None
                           else eda_sentences(raw.pair_texts[i], eda_alpha, eda_num_aug, wordnet, rng))
            for k, text in enumerate(copies):
                ids.append(raw.ids[i])
                texts.append(text)
                labels.append(raw.labels[i])
                if pairs is not None:
                    pairs.append(pair_copies[k])
        added["eda"] = len(ids) - before
    if "swap" in methods:
        if not (spec.is_pair and spec.symmetric):
            raise ValueError(f"task {spec.name}: --augment swap needs a symmetric sentence-pair task")
        count = len(ids)
        ids, texts, pairs, labels = ids + ids, texts + pairs, pairs + texts, labels + labels
        added["swap"] = count
    return replace(raw, ids=ids, texts=texts, pair_texts=pairs, labels=labels, sources=raw.num_sources), added
