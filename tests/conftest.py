"""Test-wide settings: nothing downloads, nothing reaches a server unless a test starts one itself."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import finetune  # noqa: E402

finetune.tune()  # the suite runs tuned for CPU, as the CLI and the README's quick start do
