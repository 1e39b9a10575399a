#!/usr/bin/env python3
"""Seeded train / eval / test splits of VADER's movie-review snippets (Hutto & Gilbert 2014,
10,605 sentences with human mean sentiment scores; label = sign of the score, 0 left out), written
as JSON Lines in two formats:
  chat:           {"messages": [system, user: question + review, assistant: "positive"|"negative"]}
  classification: {"text": review, "label": "positive"|"negative"}
  instruction:    {"instruction": question, "input": review, "output": "positive"|"negative"}
                  (for base models, which have no chat template)
Standard library only.

usage: prepare_sentiment.py GROUND_TRUTH.txt OUT_DIR [--train N] [--eval N] [--test N] [--seed S]
"""
import argparse
import json
import os
import random

SYSTEM = "You label the sentiment of movie reviews."
QUESTION = "Is this movie review positive or negative?"


def read(path):
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise SystemExit(f"{path}:{n}: expected 'id<TAB>score<TAB>text', got {len(parts)} fields")
            score = float(parts[1])
            if score == 0:
                continue
            rows.append((parts[2].strip(), "positive" if score > 0 else "negative"))
    return rows


def write(path, rows, fmt):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for text, label in rows:
            if fmt == "chat":
                rec = {"messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{QUESTION}\n\n{text}"},
                    {"role": "assistant", "content": label},
                ]}
            elif fmt == "instruction":
                rec = {"instruction": QUESTION, "input": text, "output": label}
            else:
                rec = {"text": text, "label": label}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ground_truth")
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    rows = read(a.ground_truth)
    if a.train + a.eval + a.test > len(rows):
        raise SystemExit(f"asked for {a.train + a.eval + a.test} examples, the file has {len(rows)}")
    random.Random(a.seed).shuffle(rows)
    splits = {
        "test": rows[: a.test],
        "eval": rows[a.test : a.test + a.eval],
        "train": rows[a.test + a.eval : a.test + a.eval + a.train],
    }
    os.makedirs(a.out_dir, exist_ok=True)
    for name, part in splits.items():
        for fmt in ("chat", "classification", "instruction"):
            write(os.path.join(a.out_dir, f"{name}.{fmt}.jsonl"), part, fmt)
        pos = sum(1 for _, l in part if l == "positive")
        print(f"{name}: {len(part)} examples ({pos} positive, {len(part) - pos} negative)")


if __name__ == "__main__":
    main()
