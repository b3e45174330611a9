"""Push to the Hub: the real huggingface_hub client against the Hub-compatible server of tests/hub_server.py."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

import finetune
from finetune.cli import main as cli_main
from finetune.errors import ConfigError, HubError
from finetune.hf import hub as finetune_hub
from finetune.hf.push import PushToHub, push_folder
from tests.hub_server import HubServer
from tests.models.reference import padded_text_batch, tiny_bert

TOKEN = "hf_plantedSecretToken4f2a9c7e"
REPO = "org/tiny-bert"


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A fresh Hub on 127.0.0.1, with the client pointed at it, a private HF_HOME, and TOKEN as HF_TOKEN."""
    from huggingface_hub import constants, hf_api

    hub = HubServer(tokens={TOKEN}).start()
    home = tmp_path / "hf_home"
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_TOKEN": TOKEN,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    patched = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for key, value in patched.items():  # huggingface_hub reads these at import time
        monkeypatch.setattr(constants, key, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # the module-level HfApi behind huggingface_hub.list_*
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A seeded random tiny transformers BERT encoder saved as safetensors."""
    _, path = tiny_bert(tmp_path_factory.mktemp("bert"), "BertModel")
    return path


@pytest.fixture
def model(bert_dir):
    return finetune.load(bert_dir, task="text-classification", num_labels=2)


def inputs() -> dict[str, np.ndarray]:
    input_ids, attention_mask = padded_text_batch(256, lengths=(9, 5, 2))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def export(model, tmp_path) -> Path:
    return model.save_pretrained(tmp_path / "export")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- round trip
def test_push_then_load_gives_the_same_logits_in_finetune_and_transformers(server, model):
    import torch
    import transformers

    url = model.push_to_hub(REPO, commit_message="first push")
    sha = server.repos[REPO].branches["main"]
    assert url == f"{server.url}/{REPO}/commit/{sha}"
    assert server.repos[REPO].commits[sha].message == "first push"
    assert {"config.json", "model.safetensors", "README.md"} <= set(server.repos[REPO].commits[sha].files)
    assert server.log("POST /api/validate-yaml")  # the model card's metadata was checked
    expected = np.asarray(model(**inputs()))

    reloaded = finetune.load(REPO, task="text-classification")  # the Hub-id path of finetune.hf.hub.resolve
    np.testing.assert_allclose(np.asarray(reloaded(**inputs())), expected, atol=1e-5)
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(REPO).eval()
    with torch.no_grad():
        logits = torch_model(**{k: torch.as_tensor(v.astype(np.int64)) for k, v in inputs().items()}).logits
    np.testing.assert_allclose(logits.numpy(), expected, atol=1e-5)
    assert server.log("HEAD /org/tiny-bert/resolve/")  # metadata through HEAD, then the LFS redirect
    assert server.log("GET /lfs/")


def test_weights_take_the_lfs_path_and_downloads_never_send_the_token_to_storage(server, model, tmp_path):
    push_folder(export(model, tmp_path), REPO)
    assert server.log("POST /org/tiny-bert.git/info/lfs/objects/batch")
    assert server.log("PUT /lfs/") and server.log("/verify")
    entry = server.repos[REPO].commits[server.repos[REPO].branches["main"]].files["model.safetensors"]
    assert entry.lfs and entry.data == (tmp_path / "export" / "model.safetensors").read_bytes()
    finetune_hub.resolve(REPO)
    storage = [r for r in server.requests if r.path.startswith("/lfs/")]
    assert storage and not any("authorization" in r.headers for r in storage)


def test_a_revision_push_creates_the_branch_and_leaves_main_alone(server, model):
    model.push_to_hub(REPO)
    main = server.repos[REPO].branches["main"]
    url = model.push_to_hub(REPO, revision="experiment", commit_message="on a branch", license="mit")  # a new card
    branch = server.repos[REPO].branches["experiment"]
    assert branch != main and server.repos[REPO].branches["main"] == main
    assert url.endswith(f"/commit/{branch}")
    assert server.log("POST /api/models/org/tiny-bert/branch/experiment")
    assert finetune_hub.resolve(REPO, revision="experiment").name == branch


def test_a_second_identical_push_uploads_nothing_again(server, model, tmp_path):
    folder = export(model, tmp_path)
    push_folder(folder, REPO)
    uploads = len(server.log("PUT /lfs/"))
    push_folder(folder, REPO)
    assert len(server.log("PUT /lfs/")) == uploads


def test_private_repository_needs_the_token_to_read(server, model):
    from huggingface_hub import HfApi

    model.push_to_hub(REPO, private=True)
    assert server.repos[REPO].private
    with pytest.raises(Exception, match="Repository Not Found|401"):
        HfApi(token=False).model_info(REPO)
    assert HfApi(token=TOKEN).model_info(REPO).private


# ---------------------------------------------------------------------- failures
def test_server_down_gives_a_clear_error_keeps_the_export_and_a_retry_succeeds(server, model, tmp_path):
    folder = export(model, tmp_path)
    before = snapshot(folder)
    server.stop()
    with pytest.raises(HubError, match=r"could not reach the Hub .* local files in .* are intact"):
        push_folder(folder, REPO)
    assert snapshot(folder) == before
    server.start()
    assert push_folder(folder, REPO).startswith(f"{server.url}/{REPO}/commit/")


@pytest.mark.parametrize("failure", ["drop", 500])
def test_failure_mid_commit_keeps_the_export_and_a_retry_completes(server, model, tmp_path, failure):
    folder = export(model, tmp_path)
    before = snapshot(folder)
    server.inject("/commit/main", drop=failure == "drop", status=None if failure == "drop" else failure)
    with pytest.raises(HubError, match="intact"):
        push_folder(folder, REPO)
    assert snapshot(folder) == before
    assert set(server.repos[REPO].commits[server.repos[REPO].branches["main"]].files) == {".gitattributes"}
    url = push_folder(folder, REPO)
    files = server.repos[REPO].commits[url.rsplit("/", 1)[1]].files
    assert files["model.safetensors"].data == before["model.safetensors"]


def test_failure_during_the_lfs_upload_then_retry(server, model, tmp_path, monkeypatch):
    import functools

    from huggingface_hub import lfs

    monkeypatch.setattr(
        lfs, "http_backoff", functools.partial(lfs.http_backoff, base_wait_time=0.01, max_wait_time=0.01)
    )
    folder = export(model, tmp_path)
    server.inject("PUT /lfs/", drop=True, times=10)  # more than huggingface_hub's own retries
    with pytest.raises(HubError, match="intact"):
        push_folder(folder, REPO)
    server.faults.clear()
    push_folder(folder, REPO)
    assert finetune.load(REPO, task="text-classification") is not None


def test_no_token_is_a_clear_error_before_any_request(server, model, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"needs a write token.*HF_TOKEN.*hf auth login"):
        model.push_to_hub(REPO)
    assert server.requests == []


def test_a_wrong_token_is_refused_with_a_message_without_it(server, model):
    with pytest.raises(HubError, match="refused the token") as info:
        model.push_to_hub(REPO, token="hf_wrongTokenValue123")
    assert "hf_wrongTokenValue123" not in str(info.value)


def test_incomplete_or_staging_directories_are_not_pushed(server, model, tmp_path):
    folder = export(model, tmp_path)
    staging = tmp_path / ".export.partial-abc"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="unfinished"):
        push_folder(staging, REPO)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="lacks model.safetensors"):
        push_folder(folder, REPO)
    with pytest.raises(ConfigError, match="`repo_id`"):
        push_folder(folder, "../escape")
    assert server.requests == []


def test_the_token_never_leaks_into_logs_card_config_or_files(server, model, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model.fit(
        {
            "input_ids": inputs()["input_ids"],
            "attention_mask": inputs()["attention_mask"],
            "labels": np.array([0, 1, 0]),
        },
        epochs=1,
        batch_size=3,
        verbose=0,
        checkpoint_dir=tmp_path / "ckpt",
    )
    model.push_to_hub(REPO)
    server.inject("/commit/main", status=500)
    with pytest.raises(HubError) as info:
        model.push_to_hub(REPO, commit_message="again", license="mit")
    assert TOKEN not in str(info.value)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    for request in server.requests:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        assert TOKEN not in json.dumps(headers) + request.path and TOKEN.encode() not in request.body
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)
    for entry in server.repos[REPO].commits[server.repos[REPO].branches["main"]].files.values():
        assert TOKEN.encode() not in entry.data
    for path in [*export(model, tmp_path).rglob("*"), *(tmp_path / "ckpt").rglob("*")]:
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()


@pytest.mark.parametrize("name", ["../evil.json", "../../evil.json", "sub/../../evil.json"])
def test_hostile_file_names_served_by_the_hub_are_refused_and_never_written(server, bert_dir, name):
    files = {p.name: p.read_bytes() for p in Path(bert_dir).iterdir() if p.is_file()}
    server.plant("org/hostile", {**files, name: b"{}"})
    with pytest.raises(ValueError, match="outside its folder.*evil"):  # refused from the file list, before any fetch
        finetune_hub.resolve("org/hostile")
    assert list(Path(os.environ["HF_HOME"]).rglob("*evil*")) == []


# ---------------------------------------------------------------------- CLI and callback
def test_cli_push_prints_the_commit_url(server, model, tmp_path, capsys):
    folder = export(model, tmp_path)
    assert cli_main(["push", str(folder), REPO, "--revision", "cli", "--message", "from the CLI"]) == 0
    sha = server.repos[REPO].branches["cli"]
    assert capsys.readouterr().out.strip() == f"{server.url}/{REPO}/commit/{sha}"
    assert server.repos[REPO].commits[sha].message == "from the CLI"
    server.stop()
    assert cli_main(["push", str(folder), REPO]) == 2
    assert "could not reach the Hub" in capsys.readouterr().err


def test_push_to_hub_callback_pushes_model_and_latest_checkpoint_in_the_background(server, model, tmp_path):
    data = {**inputs(), "labels": np.array([0, 1, 0])}
    push = PushToHub(REPO, strategy="checkpoint", commit_message="training")
    server.inject("/commit/main", delay=2.0)  # a slow Hub: training must not wait for it
    model.fit(data, epochs=2, batch_size=3, verbose=0, checkpoint_dir=tmp_path / "ckpt", callbacks=[push])
    assert not push.wait(timeout=0)  # fit returned while the upload is still running
    assert push.wait(timeout=60) and push.last_error is None, push.last_error
    files = server.repos[REPO].commits[server.repos[REPO].branches["main"]].files
    assert {"config.json", "model.safetensors"} <= set(files)
    steps = {p.split("/")[1] for p in files if p.startswith("last-checkpoint/")}
    assert steps == {"2"}  # only the latest checkpoint, the previous one deleted in the same commit
    assert server.repos[REPO].commits[push.commit_urls[-1].rsplit("/", 1)[1]].message == "training (end of training)"
    expected = np.asarray(model(**inputs()))
    np.testing.assert_allclose(
        np.asarray(finetune.load(REPO, task="text-classification")(**inputs())), expected, atol=1e-5
    )


def test_push_to_hub_callback_failures_are_logged_not_fatal(server, model, caplog):
    data = {**inputs(), "labels": np.array([0, 1, 0])}
    server.stop()
    push = PushToHub(REPO, strategy="every_save")
    history = model.fit(data, epochs=2, batch_size=3, verbose=0, callbacks=[push])
    assert len(history.history["loss"]) == 2
    assert push.wait(timeout=60)
    assert isinstance(push.last_error, HubError) and push.commit_urls == []
    assert "PushToHub" in caplog.text and TOKEN not in caplog.text
    with pytest.raises(ConfigError, match="strategy"):
        PushToHub(REPO, strategy="sometimes")


@pytest.mark.parametrize("source", ["argument", "store"])
def test_a_token_from_the_argument_or_the_store_never_leaks_either(
    server, model, tmp_path, monkeypatch, capsys, caplog, source
):
    from huggingface_hub import constants

    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    kwargs = {"token": TOKEN} if source == "argument" else {}
    if source == "store":
        Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    url = model.push_to_hub(REPO, **kwargs)
    assert TOKEN not in url
    server.inject("/commit/main", status=500)
    with pytest.raises(HubError) as info:
        model.push_to_hub(REPO, commit_message="again", license="mit", **kwargs)  # a changed card: a new commit
    out = capsys.readouterr()
    assert TOKEN not in str(info.value) + out.out + out.err + caplog.text
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)
    for path in export(model, tmp_path).rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()
