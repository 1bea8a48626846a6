"""Trainer: `loraplex train` — QLoRA fine-tuning that writes a PEFT adapter.

    loraplex train --model default --data FILE.jsonl --out adapters/NAME \
        [--r 16 --alpha 32 --targets q,k,v,o,gate,up,down --epochs 3 --lr 2e-4 \
         --batch 4 --max-len 512 --seed 0 --quantization nf4|none]

One plain loop: shuffle, pad each batch to its longest example, AdamW on the LoRA
parameters only, linear warm-up then linear decay, gradient clipping at 1.0.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.config import ConfigError
from server.errors import LoraplexError
from server.fingerprint import model_content_hash
from server.model.loader import resolve_model_dir
from server.train.config import TARGET_MODULES, TrainConfig
from server.train.data import IGNORE, Example, load_examples
from server.train.export import save_adapter
from server.train.model import add_lora, load_base, load_tokenizer
from server.train.provenance import provenance_metadata

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    losses: list[float]         # the mean loss of each optimizer step, in order
    examples: int
    steps: int
    seconds: float              # training loop only (not loading or writing)


def make_batch(examples: list[Example], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one step: input_ids, attention_mask, labels, each (B, L)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear ramp over `warmup` steps, then linear decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, total - warmup)


def fit(model: nn.Module, examples: list[Example], cfg: TrainConfig, pad_id: int,
        progress: bool = True) -> list[float]:
    """Train the LoRA parameters of `model` in place; the mean loss of each step."""
    from tqdm import tqdm
    device = cfg.resolved_device()
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "no trainable parameters: LoRA was not added"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = (len(examples) + cfg.batch - 1) // cfg.batch
    total = per_epoch * cfg.epochs
    warmup = int(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, file=sys.stderr)
    for epoch in range(cfg.epochs):
        order = list(examples)
        rng.shuffle(order)
        for b in range(per_epoch):
            batch = make_batch(order[b * cfg.batch:(b + 1) * cfg.batch], pad_id, device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Load the base, add LoRA, fit on cfg.data, write the adapter to cfg.out."""
    folder = resolve_model_dir(cfg.model)    # "default", an HF folder, or a .gguf (converted once)
    tokenizer = load_tokenizer(folder)
    examples = load_examples(cfg.data, tokenizer, cfg.max_len)  # validate before the slow part
    n_tokens = sum(sum(t != IGNORE for t in e.labels) for e in examples)
    log.info("%d examples, %d completion tokens from %s", len(examples), n_tokens, cfg.data)
    base_hash = model_content_hash(folder)
    model = add_lora(load_base(folder, cfg), cfg)
    t0 = time.perf_counter()
    losses = fit(model, examples, cfg, tokenizer.pad_token_id, progress)
    seconds = time.perf_counter() - t0
    out = save_adapter(model, cfg.out, cfg.model, provenance_metadata(base_hash, cfg.model, cfg.as_record()))
    log.info("wrote %s after %d steps in %.1f s (loss %.4f -> %.4f)",
             out, len(losses), seconds, losses[0], losses[-1])
    return TrainResult(out, losses, len(examples), len(losses), seconds)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(prog="loraplex train", description="QLoRA fine-tuning that writes a PEFT adapter.")
    p.add_argument("--model", default=d.model, help="HF folder, or 'default'")
    p.add_argument("--data", required=True, help="JSONL of {messages} or {prompt, completion}")
    p.add_argument("--out", required=True, help="adapter folder to write, e.g. adapters/NAME")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--alpha", type=float, default=d.alpha, help="default 2 * r")
    p.add_argument("--targets", default=",".join(d.targets),
                   help=f"comma-separated subset of {','.join(TARGET_MODULES)}")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quantization", default=d.quantization, choices=["nf4", "none"])
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    return p


def config_from_args(argv: list[str]) -> TrainConfig:
    a = build_parser().parse_args(argv)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    return TrainConfig(data=a.data, out=a.out, model=a.model, r=a.r, alpha=a.alpha, targets=targets,
                       epochs=a.epochs, lr=a.lr, batch=a.batch, max_len=a.max_len, seed=a.seed,
                       quantization=a.quantization, device=a.device)


def main(argv: list[str]) -> int:
    """Entry point of `loraplex train`; typed errors become one line on stderr and exit 2."""
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except (ConfigError, LoraplexError) as e:
        print(f"loraplex train: error: {e}", file=sys.stderr)
        return 2
    print(result.out)
    return 0
