"""Tokenizer, IncrementalDetokenizer and StopStringBuffer against full decodes."""
import pytest

from server.model.default import ensure_default_model
from server.tokenizer import IncrementalDetokenizer, StopStringBuffer, Tokenizer

TEXTS = [
    "héllo 日本語 🎉 ok, naïve café — ∑x² 👩‍👩‍👧 done",
    "def f(x):\n    return {'a': [1, 2]}  # tab\tend",
    "Ünïcödé 🇯🇵🇫🇷 mixed ascii and 漢字かなカナ.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(ensure_default_model())


def test_eos_and_chat_template(tok):
    assert 2 in tok.eos_token_ids  # <|im_end|> of SmolLM2, from both tokenizer and generation config
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ref = tok.hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     tokenize=True)["input_ids"]
    assert ids == list(ref)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_detokenize_matches_full_decode(tok, text, chunk):
    prompt = tok.encode("Say something:")
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, prompt)
    pieces = [det.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(det.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never half a multi-byte character


def test_multibyte_held_until_complete(tok):
    ids = tok.encode(" 🎉")
    assert len(ids) > 1  # the emoji is split over byte tokens
    det = IncrementalDetokenizer(tok, [])
    assert [det.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.push(ids[-1:]) == " 🎉"


@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_string_cut_and_never_emitted(tok, chunk):
    text = "The answer is 42. STOP here and more text"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], stop=("STOP",))
    out = ""
    for i in range(0, len(ids), chunk):
        out += det.push(ids[i:i + chunk])
        assert "S" not in out[len("The answer is 42. "):]  # nothing of the stop string leaks
        if det.stopped:
            break
    assert det.stopped
    assert out + det.flush() == "The answer is 42. "


def test_stop_buffer_holds_back_possible_prefix():
    buf = StopStringBuffer(("</end>", "xyz"))
    assert buf.push("abc </e") == ("abc ", False)
    assert buf.pending == "</e"
    assert buf.push("nx") == ("</en", False)    # not "</end>" after all: released; "x" may start "xyz"
    assert buf.pending == "x"
    assert buf.push("y") == ("", False)
    assert buf.push("zq") == ("", True)          # stop string reached: cut before it
    buf = StopStringBuffer(("ab",))
    assert buf.push("xa") == ("x", False)
    assert buf.flush() == "a"                    # request ended otherwise: held text comes out


def test_stop_string_spanning_pushes_earliest_wins():
    buf = StopStringBuffer(("long stop", "op"))
    assert buf.push("a long st") == ("a ", False)
    # "long stop" starts first (index 2) though "op" also matches: cut at the earliest start
    assert buf.push("op!") == ("", True)
