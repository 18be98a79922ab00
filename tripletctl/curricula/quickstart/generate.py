"""Build the quickstart's offline assets: a small labelled corpus, a held-out set, and a tiny BERT
(config + WordPiece vocabulary) — so `tripletctl train curricula/quickstart.yaml` needs no network.

The corpus is synthetic but not trivial: each of 48 topics has its own signature words, topics come
in confusable pairs that share part of their vocabulary, and most of every sentence is background
words common to all topics. Retrieval must learn which words matter.

Run `python curricula/quickstart/generate.py` to rebuild; the output is deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_TOPICS = 48
SIGNATURE_WORDS = 10
SHARED_WITH_TWIN = 6
BACKGROUND_WORDS = 300
TRAIN_PER_TOPIC = 300
HELDOUT_PER_TOPIC = 25
SEED = 1234

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tu",
    "sa",
    "vor",
    "el",
    "pi",
    "dan",
    "qu",
    "ri",
    "zo",
    "ne",
    "ba",
    "tor",
    "shi",
    "fa",
    "gul",
    "ha",
    "jin",
    "ko",
    "lu",
    "mor",
    "na",
    "ost",
    "pe",
    "rak",
    "sel",
    "ti",
]


def _words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def build_topics(rng: random.Random) -> tuple[list[list[str]], list[str]]:
    taken: set[str] = set()
    background = _words(rng, BACKGROUND_WORDS, taken)
    signatures = [_words(rng, SIGNATURE_WORDS, taken) for _ in range(NUM_TOPICS)]
    twin_shared = [_words(rng, SHARED_WITH_TWIN, taken) for _ in range(NUM_TOPICS // 2)]
    topics = [signatures[t] + twin_shared[t // 2] for t in range(NUM_TOPICS)]
    return topics, background


def sentence(rng: random.Random, topic_words: list[str], background: list[str]) -> str:
    length = rng.randint(8, 20)
    tokens = [rng.choice(topic_words) if rng.random() < 0.45 else rng.choice(background) for _ in range(length)]
    return " ".join(tokens)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    topics, background = build_topics(rng)
    train_rows, heldout_rows = [], []
    for topic, words in enumerate(topics):
        label = f"topic-{topic:02d}"
        train_rows += [{"text": sentence(rng, words, background), "label": label} for _ in range(TRAIN_PER_TOPIC)]
        heldout_rows += [{"text": sentence(rng, words, background), "label": label} for _ in range(HELDOUT_PER_TOPIC)]
    rng.shuffle(train_rows)
    rng.shuffle(heldout_rows)
    write_jsonl(HERE / "train.jsonl", train_rows)
    write_jsonl(HERE / "heldout.jsonl", heldout_rows)

    vocabulary = sorted({w for words in topics for w in words} | set(background))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["##" + c for c in letters]
    vocab = specials + letters + pieces + vocabulary
    model_dir = HERE / "tiny-bert"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": len(vocab),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 64,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(train_rows)} train rows, {len(heldout_rows)} held-out rows, vocab of {len(vocab)} to {HERE}")


if __name__ == "__main__":
    main()
