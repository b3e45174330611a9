"""Importing finetune changes nothing global; `ft.tune()` is the CPU tuning, as one explicit call.

Each case runs in a fresh interpreter, so that JAX has not started yet when finetune is imported or tuned.
"""

import json
import os
import subprocess
import sys

import pytest

SNAPSHOT = """
import json, logging, os, sys, warnings
import jax

def snapshot():
    return {
        "environ": dict(os.environ),
        "jax_config": {k: repr(v) for k, v in jax.config.values.items()},
        "cache_dir": jax.config.jax_compilation_cache_dir,
        "root_handlers": len(logging.getLogger().handlers),
        "root_level": logging.getLogger().level,
        "warning_filters": len(warnings.filters),
        "log_record_factory": repr(logging.getLogRecordFactory()),
        "showwarning": repr(warnings.showwarning),
    }
"""


def run(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "JAX_", "XLA_"))}
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT + code], env={**clean, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_finetune_leaves_the_environment_jax_config_and_logging_as_they_were():
    got = run(
        "before = snapshot()\n"
        "import finetune, finetune.cli, finetune.callbacks\n"
        "print(json.dumps({'before': before, 'after': snapshot()}))"
    )
    before, after = got["before"], got["after"]
    for key in before:
        if key == "jax_config":
            changed = {k: (v, after[key].get(k)) for k, v in before[key].items() if after[key].get(k) != v}
            assert not changed, f"import finetune changed jax.config: {changed}"
        elif key == "environ":
            changed = {k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k)}
            assert not changed, f"import finetune changed os.environ: {sorted(changed)}"
        else:
            assert after[key] == before[key], key


TUNED = (
    "import finetune as ft\n"
    "t = ft.tune(compile_cache=sys.argv[-1] if len(sys.argv) > 1 else False)\n"
    "print(json.dumps({'flags': os.environ.get('XLA_FLAGS', ''), 'async': jax.config.read("
    "'jax_cpu_enable_async_dispatch'), 'cache': jax.config.jax_compilation_cache_dir, "
    "'kept': ft.runtime.tuning().keep_scratch, 'added': list(t.xla_flags)}))"
)


def test_tune_sets_the_scheduler_flag_synchronous_dispatch_and_the_kept_scratch():
    got = run(TUNED)
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in got["flags"]
    assert got["added"] == ["--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert got["async"] is False and got["kept"] is True and got["cache"] in (None, "")


def test_tune_turns_the_compilation_cache_on_where_asked(tmp_path):
    code = TUNED.replace("sys.argv[-1] if len(sys.argv) > 1 else False", repr(str(tmp_path / "xla")))
    got = run(code)
    assert got["cache"] == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()


@pytest.mark.parametrize(
    ("env", "flag", "asynchronous"),
    [
        ({"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}, "=true", False),
        ({"JAX_CPU_ENABLE_ASYNC_DISPATCH": "1"}, "=false", True),
    ],
    ids=["user-set-flag", "user-set-dispatch"],
)
def test_what_the_user_set_wins_over_tune(env, flag, asynchronous):
    got = run(TUNED, **env)
    assert got["flags"].count("xla_cpu_enable_concurrency_optimized_scheduler") == 1
    assert got["flags"].endswith(flag) and got["async"] is asynchronous


def test_tune_after_jax_started_leaves_xla_flags_and_dispatch_alone():
    got = run("jax.numpy.zeros(1).block_until_ready()\n" + TUNED)
    assert got["flags"] == "" and got["async"] is True and got["added"] == []


def test_the_cli_tunes_unless_opted_out_by_the_environment(tmp_path):
    code = (
        "import finetune.cli, finetune.runtime\n"
        "assert finetune.cli.main(['presets']) == 0\n"
        "t = finetune.runtime.tuning()\n"
        "print(json.dumps({'async': jax.config.read('jax_cpu_enable_async_dispatch'), 'cache': t.compile_cache}))"
    )
    assert run(code, FINETUNE_COMPILATION_CACHE=str(tmp_path)) == {"async": False, "cache": str(tmp_path)}
    assert run(code, FINETUNE_XLA_DEFAULTS="0", FINETUNE_COMPILATION_CACHE="0") == {"async": True, "cache": None}
