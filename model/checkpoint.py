"""Checkpoints: weights, config and vocabulary in one file that loads with weights_only=True."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from model.config import GPTConfig, TrainConfig
from model.data import CharTokenizer, DataError
from model.gpt import GPT
from model.seq2seq import EncoderDecoder
from model.tasks import MODELS

CHECKPOINT_FILE = "ckpt.pt"


def save_checkpoint(out_dir: str | os.PathLike, model: GPT | EncoderDecoder, tokenizer: CharTokenizer,
                    train_config: TrainConfig | None = None, extra: dict | None = None) -> Path:
    """Write out_dir/ckpt.pt atomically (a crash never leaves a truncated checkpoint)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": arch_of(model),
        "gpt_config": dataclasses.asdict(model.config),
        "train_config": dataclasses.asdict(train_config) if train_config else None,
        "vocab": tokenizer.vocab,
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".ckpt.", suffix=".part")
    os.close(fd)
    path = out / CHECKPOINT_FILE
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def arch_of(model: torch.nn.Module) -> str:
    arch = next((arch for arch, cls in MODELS.items() if type(model) is cls), None)
    if arch is None:
        raise TypeError(f"cannot save a {type(model).__name__}: a checkpoint holds a GPT or an EncoderDecoder")
    return arch


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[GPT | EncoderDecoder, CharTokenizer, dict]:
    """Load a checkpoint file, or the ckpt.pt inside a directory; returns (model in eval mode, tokenizer, payload)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint there")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model = MODELS[payload.get("arch", "gpt")](GPTConfig(**payload["gpt_config"]))  # older files: GPTs
        model.load_state_dict(payload["model"])
    except Exception as exc:  # any unpickling or shape problem means the file is not ours or is damaged
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    return model.to(device).eval(), CharTokenizer(payload["vocab"]), payload
