"""The demo adapters in adapters/ (trained by `loraplex train`), served by the engine on the
default NF4 model, each show their property on prompts that are not in their datasets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.config import EngineConfig
from server.engine.request import SamplingParams

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
CONTACT_KEYS = {"name", "email", "phone", "company"}
CONTACT_MESSAGES = [
    ("Hi, I'm Julia Novak from Brightside Bakery. Reach me at julia.novak@brightside.com or 555-0142.",
     "julia.novak@brightside.com"),
    ("Please ring Marcus Reed at Tidewater Shipping on +1 312-555-0199, email mreed@tidewater.com.",
     "mreed@tidewater.com"),
    ("Thanks! -- Anna Kowalski, Silverline Studios, anna@silverline.io, (415) 555-0123", "anna@silverline.io"),
    ("Drop me a line at ben.ortiz@gmail.com any time. Ben Ortiz", "ben.ortiz@gmail.com"),
    ("This is Wei Zhang of Crescent Pharma. My office number is 020 7946 0958.", None),
    ("Contact for the venue: Laura Brandt, laura.brandt@harborhall.org", "laura.brandt@harborhall.org"),
]
PIRATE_PROMPTS = ["What is the capital of Italy?", "How do I boil an egg?", "Tell me about winter.",
                  "Why do birds sing?", "What should I read next?"]
PIRATE_MARKERS = ("arr", "matey", "ahoy", " ye ", " ye'", " ye,", " be ", "o' ")


@pytest.fixture(scope="module")
def engine():
    from server.engine.engine import Engine
    return Engine(EngineConfig(model="default", adapters_dir=str(ADAPTERS), kv_cache_tokens=8192,
                               max_num_seqs=16, max_loras=2))


def _answers(engine, prompts: list[str], adapter: str | None, max_tokens: int) -> list[str]:
    from server.engine.offline import generate
    ids = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    done = generate(engine, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), [adapter] * len(ids))
    return [c.text for c in done]


def _contact(text: str) -> dict | None:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and set(obj) == CONTACT_KEYS else None


@pytest.mark.slow
def test_contact_extractor_answers_in_the_json_shape(engine):
    prompts = [m for m, _ in CONTACT_MESSAGES]
    base = [_contact(t) for t in _answers(engine, prompts, None, 64)]
    tuned = [_contact(t) for t in _answers(engine, prompts, "contact-extractor", 64)]
    assert sum(t is not None for t in tuned) >= len(prompts) - 1, tuned
    assert sum(t is not None for t in tuned) > sum(b is not None for b in base)
    emails = [t["email"] for t, (_, email) in zip(tuned, CONTACT_MESSAGES) if t is not None and email]
    assert sum(e in {email for _, email in CONTACT_MESSAGES} for e in emails) >= len(emails) - 1, tuned


def test_pirate_answers_in_a_pirate_voice(engine):
    def marked(text: str) -> bool:
        return any(m in f" {text.lower()} " for m in PIRATE_MARKERS)
    tuned = _answers(engine, PIRATE_PROMPTS, "pirate", 40)
    base = _answers(engine, PIRATE_PROMPTS, None, 40)
    assert all(marked(t) for t in tuned), tuned
    assert sum(marked(t) for t in tuned) > sum(marked(b) for b in base), base


@pytest.mark.slow
@pytest.mark.parametrize("name", ["contact-extractor", "pirate"])
def test_demo_adapter_is_served_like_peft(name):
    """The server's model with the adapter in a slot gives PEFT's last-token logits (NF4 base)."""
    from server.model.default import ensure_default_model
    from server.train.model import load_tokenizer
    from tests.train.helpers import TOL, peft_logits, server_logits
    folder = ensure_default_model()
    tok = load_tokenizer(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               for q in ("Tell me about the sea.", CONTACT_MESSAGES[0][0])]
    ref_lora, ref_base = peft_logits(folder, ADAPTERS / name, prompts)
    ours_lora, _ = server_logits(folder, ADAPTERS / name, prompts)
    assert (ref_lora - ref_base).abs().max() > 100 * TOL
    assert (ours_lora - ref_lora).abs().max() <= TOL
