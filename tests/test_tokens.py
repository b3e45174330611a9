"""No token anywhere: a Hub token is checked before any request, and no form of it reaches a message, a log record,
an exception chain, ``last_error``, the standard streams, or a file, even when the Hub echoes it back."""

from __future__ import annotations

import base64
import logging
import traceback
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

import finetune
from finetune.cli import main as cli_main
from finetune.errors import ConfigError, HubError
from finetune.hf import scrub
from finetune.hf.push import PushToHub, push_folder
from tests import hub_server, test_hub
from tests.catalogue import assert_unchanged, snapshot
from tests.test_hub import REPO, TOKEN, export, inputs
from tests.tiny import params_of

server, bert_dir, model = test_hub.server, test_hub.bert_dir, test_hub.model  # the Hub test fixtures

BASIC = base64.b64encode(f"user:{TOKEN}".encode()).decode()  # a basic-auth header's credentials
SECRETS = (TOKEN, BASIC, quote(f"{TOKEN}&", safe=""), repr(f"Bearer {TOKEN}\n".encode()))


def leaks(text: str) -> list[str]:
    """The 12-character pieces of the token (or of its encodings) that ``text`` holds."""
    return [s[i : i + 12] for s in SECRETS for i in range(len(s) - 11) if s[i : i + 12] in text]


def exception_text(error: BaseException) -> str:
    """Everything a traceback or a debugger shows of ``error`` and its chain: str, repr, args of each."""
    parts, seen, todo = ["".join(traceback.format_exception(error))], set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args), repr(getattr(e, "__notes__", ""))]
        parts += [repr(v) for k, v in vars(e).items() if isinstance(v, (str, bytes))]
        todo += [e.__cause__, e.__context__]
    return "\n".join(parts)


def files_text(*folders: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("latin-1")
        for folder in folders
        if folder.exists()
        for p in folder.rglob("*")
        if p.is_file()
    )


@pytest.fixture
def echoing(monkeypatch):
    """Makes the server's commit answer ``status`` with a body that echoes the credentials in several forms (as a
    verbose proxy or a broken server might)."""

    def install(status: int) -> None:
        route = hub_server._route

        def echo(hub, req, method, body):
            if "/commit/" in req.path:
                auth = req.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ")
                basic = base64.b64encode(f"user:{token}".encode()).decode()
                raw = f"Bearer {token}\n".encode()
                raise hub_server.Reply(
                    status, f"rejected {auth!r}; basic {basic}; url ?t={quote(token + '&', safe='')}; raw {raw!r}"
                )
            return route(hub, req, method, body)

        monkeypatch.setattr(hub_server, "_route", echo)

    return install


@pytest.fixture
def capture_all(caplog):
    """caplog at DEBUG for every logger, including those that set their own level."""
    for name in (None, "finetune", "huggingface_hub", "httpx", "httpcore", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


# ---------------------------------------------------------------------- the check, before any request
@pytest.mark.parametrize(
    ("token", "shown", "env"),
    [
        pytest.param(12345, "token=12345", True, id="H01-int-with-HF_TOKEN-set"),
        pytest.param(True, "token=True", False, id="H01c-true-without-HF_TOKEN"),
        pytest.param(b"hf_abc", "a bytes object", True, id="H01-bytes"),
        pytest.param("", "an empty string", True, id="H01-empty"),
    ],
)
def test_H01_a_token_that_is_not_a_string_is_refused_before_any_request(
    server, model, tmp_path, monkeypatch, token, shown, env
):
    if not env:
        monkeypatch.delenv("HF_TOKEN")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        model.push_to_hub(REPO, token=token)
    message = str(info.value)
    assert "`token`" in message and shown in message and "string" in message
    assert server.requests == []
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    ("suffix", "what"),
    [
        pytest.param("\n", "a line feed", id="H02-trailing-newline"),
        pytest.param("\r\nX-Evil: 1", "a carriage return", id="H02-header-injection"),
    ],
)
def test_H02_a_token_with_whitespace_or_control_characters_is_refused_without_showing_it(
    server, model, tmp_path, suffix, what
):
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        model.push_to_hub(REPO, token=TOKEN + suffix)
    message = str(info.value)
    assert "`token`" in message and what in message and f"position {len(TOKEN)}" in message
    assert leaks(exception_text(info.value)) == []
    assert server.requests == []
    assert_unchanged(before, tmp_path)


def test_H02_a_bad_HF_TOKEN_is_refused_too_and_the_cli_push_exits_2_without_showing_it(
    server, model, tmp_path, monkeypatch, capfd
):
    folder = export(model, tmp_path)
    monkeypatch.setenv("HF_TOKEN", f"{TOKEN}\r\nX-Evil: 1")
    with pytest.raises(ConfigError, match=r"`HF_TOKEN` holds .* nothing was sent") as info:
        model.push_to_hub(REPO)
    assert leaks(exception_text(info.value)) == []
    before = snapshot(tmp_path)
    assert cli_main(["push", str(folder), REPO]) == 2
    out = capfd.readouterr()
    assert "HF_TOKEN" in out.err and leaks(out.out + out.err) == []
    assert server.requests == []
    assert_unchanged(before, tmp_path)


def test_a_bad_token_is_refused_by_load_and_by_PushToHub_before_any_request(server, monkeypatch):
    with pytest.raises(ConfigError, match="`token` holds a line feed"):
        finetune.load("org/anything", task="text-classification", token=TOKEN + "\n")
    monkeypatch.setenv("HF_TOKEN", f"{TOKEN} x")
    with pytest.raises(ConfigError, match="`HF_TOKEN` holds a space") as info:
        finetune.load("org/anything", task="text-classification")
    assert leaks(exception_text(info.value)) == []
    with pytest.raises(ConfigError, match="`token` must be a Hub access token"):
        PushToHub(REPO, token=12345)
    assert server.requests == []


def test_PushToHub_refuses_a_malformed_HF_TOKEN_before_the_first_step(server, model, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", f"{TOKEN} x")
    before = params_of(model)
    with pytest.raises(ConfigError, match="`HF_TOKEN` holds a space") as info:
        model.fit(
            {**inputs(), "labels": np.array([0, 1, 0])}, epochs=1, batch_size=3, verbose=0, callbacks=[PushToHub(REPO)]
        )
    assert leaks(exception_text(info.value)) == []
    after = params_of(model)
    assert all(np.array_equal(before[p], after[p]) for p in before)  # not one step was taken
    assert server.requests == []


# ---------------------------------------------------------------------- the Hub refusing, and echoing the token
@pytest.mark.parametrize("status", [401, 403, 500])
def test_a_refused_push_shows_no_form_of_the_token_anywhere(
    server, model, tmp_path, echoing, capture_all, capfd, status
):
    data = {**inputs(), "labels": np.array([0, 1, 0])}
    model.fit(data, epochs=1, batch_size=3, verbose=0, checkpoint_dir=tmp_path / "ckpt")
    folder = export(model, tmp_path)
    echoing(status)
    with pytest.raises(HubError) as info:
        model.push_to_hub(REPO, token=TOKEN)
    assert REPO in str(info.value) and f"HTTP {status}" in str(info.value)
    assert info.value.__cause__ is not None  # the chain is kept for debugging, masked
    with pytest.raises(HubError) as again:
        push_folder(folder, REPO, token=TOKEN)
    out = capfd.readouterr()
    for where, text in {
        "the error": exception_text(info.value),
        "push_folder's error": exception_text(again.value),
        "logs": capture_all.text,
        "stdout/stderr": out.out + out.err,
        "the export and the checkpoints": files_text(folder, tmp_path / "ckpt"),
    }.items():
        assert leaks(text) == [], where
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)  # it was sent


def test_the_cli_push_refused_by_the_server_exits_2_without_the_token(server, model, tmp_path, echoing, capfd):
    folder = export(model, tmp_path)
    echoing(403)
    assert cli_main(["push", str(folder), REPO]) == 2
    out = capfd.readouterr()
    assert "HTTP 403" in out.err and leaks(out.out + out.err) == []


def test_a_failed_push_of_the_callback_keeps_a_masked_last_error_and_logs(server, model, echoing, capture_all):
    echoing(500)
    push = PushToHub(REPO, token=TOKEN)
    model.fit({**inputs(), "labels": np.array([0, 1, 0])}, epochs=1, batch_size=3, verbose=0, callbacks=[push])
    assert push.wait(timeout=60)
    assert isinstance(push.last_error, HubError) and "HTTP 500" in str(push.last_error)
    assert leaks(exception_text(push.last_error)) == [] and leaks(capture_all.text) == []
    assert "PushToHub" in capture_all.text


# ---------------------------------------------------------------------- files
def test_a_token_given_to_the_model_card_is_masked_in_what_is_pushed(server, model):
    model.push_to_hub(REPO, token=TOKEN, datasets=[TOKEN])
    files = server.repos[REPO].commits[server.repos[REPO].branches["main"]].files
    assert f"- {scrub.MASK}\n" in files["README.md"].data.decode()  # the card's YAML stays valid
    assert leaks("\n".join(e.data.decode("latin-1") for e in files.values())) == []


def test_a_folder_holding_the_token_is_not_pushed_and_is_left_as_it_is(server, model, tmp_path):
    folder = export(model, tmp_path)
    with open(folder / "README.md", "a") as f:
        f.write(f"\ntoken: {TOKEN}\n")
    before = snapshot(folder)
    with pytest.raises(HubError, match=r"README.md .*hold a Hub token.*nothing was uploaded") as info:
        push_folder(folder, REPO, token=TOKEN)
    assert leaks(exception_text(info.value)) == []
    assert server.requests == []
    assert_unchanged(before, folder)


# ---------------------------------------------------------------------- the scrubber itself
def test_the_scrubber_masks_every_form_in_exception_chains_and_in_log_records_of_any_logger(capture_all):
    secret = "hf_scrubberUnitTestToken0123456789"
    header = {"authorization": f"Bearer {secret}"}
    with pytest.raises(RuntimeError) as info:
        with scrub.guard(secret):
            try:
                try:
                    raise OSError(13, "denied", f"/tmp/{secret}")
                except OSError as low:
                    raw = f"Bearer {secret}\n".encode()
                    cause = ValueError(f"Illegal header value {raw!r}", header)
                    cause.add_note(f"basic {base64.b64encode(f'me:{secret}'.encode()).decode()}")
                    raise cause from low
            except ValueError as e:
                raise RuntimeError(f"failed with {quote(secret + '/', safe='')} {secret!r}") from e
    text = exception_text(info.value)
    assert "denied" in text and "Illegal header value" in text and "basic" in text  # the rest is kept
    logging.getLogger("huggingface_hub.utils._http").debug("Sending %s to %s", header, "the Hub")
    logging.getLogger("some.library").warning("retrying", exc_info=info.value)
    pieces = [secret[i : i + 10] for i in range(len(secret) - 9)]
    basic = base64.b64encode(f"me:{secret}".encode()).decode()
    pieces += [basic[i : i + 10] for i in range(4, len(basic) - 13)]
    assert [p for p in pieces if p in text] == []
    assert [p for p in pieces if p in capture_all.text] == [] and "Sending" in capture_all.text


def test_a_short_ordinary_word_is_not_masked_by_a_derived_form():
    scrub.register("hf_anotherLongEnoughToken987")
    assert scrub.scrub("loss=0.25 accuracy=0.9 step 10") == "loss=0.25 accuracy=0.9 step 10"


OPAQUE = "hf_opaqueExceptionToken4567890"


class _Opaque(Exception):
    """An exception whose message comes from neither its args nor its attributes, so it cannot be masked in place."""

    def __str__(self) -> str:
        return f"opaque failure with {OPAQUE}"


class _Attribute(Exception):
    """An exception whose message comes from an attribute."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def __str__(self) -> str:
        return f"failure with {self.secret}"


def test_a_link_of_the_chain_that_cannot_be_masked_in_place_is_cut_from_it():
    with pytest.raises(HubError) as info:
        with scrub.guard(OPAQUE):
            try:
                raise _Opaque()
            except _Opaque as e:
                raise HubError(f"the push failed ({OPAQUE[:3]}...)", ValueError(f"held {OPAQUE}")) from e
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert OPAQUE not in exception_text(info.value) and "held <redacted>" in repr(info.value.args)
    with pytest.raises(HubError) as info:
        with scrub.guard(OPAQUE):
            try:
                raise _Attribute(OPAQUE)
            except _Attribute as e:
                raise HubError("the push failed") from e
    assert str(info.value.__cause__) == "failure with <redacted>"  # masked in place, so the chain is kept


def test_a_warning_shown_after_a_token_was_registered_is_masked():
    secret = "hf_warningUnitTestToken24680"
    with pytest.warns(UserWarning) as caught:
        scrub.register(secret)  # the display goes in front of the one in place (here pytest's)
        warnings.warn(f"retrying with {secret}", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["retrying with <redacted>"]
