"""Text generation from a checkpoint: `sample_text` (a GPT continues a prompt), `next_line` (an encoder-decoder
writes the line that follows a line), `SampleSpec` (one sample's settings), and `python -m model.sample`, which does
whichever the checkpoint can."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from model.data import CharTokenizer
from model.gpt import GPT
from model.seq2seq import EncoderDecoder


@dataclass(frozen=True)
class SampleSpec:
    """Every trial's sample uses the same prompt, length, temperature and seed, so samples compare."""

    prompt: str
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 200
    seed: int = 1

    def write(self, model, tokenizer: CharTokenizer) -> str:
        """The sample these settings give from the model."""
        return sample_text(model, tokenizer, self.prompt, self.max_new_tokens, self.temperature, self.top_k, self.seed)


def sample_text(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: int | None = 200, seed: int = 1) -> str:
    """The prompt followed by max_new_tokens generated characters; the same seed gives the same text.

    From an encoder-decoder: the prompt, then line after line, each written from the one before it, until
    max_new_tokens characters (newlines included) are written.
    """
    if not prompt:
        raise ValueError("prompt must not be empty")
    if isinstance(model, EncoderDecoder):
        return _lines_after(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def _lines_after(model: EncoderDecoder, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int,
                 temperature: float, top_k: int | None, seed: int) -> str:
    text, line, i = prompt, prompt.rstrip("\n").split("\n")[-1], 0  # the prompt's last line starts the chain
    while line and len(text) - len(prompt) < max_new_tokens:  # an empty line written ends it
        line = next_line(model, tokenizer, line, temperature, top_k, seed + i)
        text, i = text + ("" if text.endswith("\n") else "\n") + line, i + 1
    return text[:len(prompt) + max_new_tokens]


def next_line(model: EncoderDecoder, tokenizer: CharTokenizer, line: str, temperature: float = 0.8,
              top_k: int | None = 200, seed: int = 1, max_new_tokens: int | None = None) -> str:
    """The line the model writes after `line` (its first block_size characters); the same seed, the same line."""
    if not line or "\n" in line:
        raise ValueError("the source must be one non-empty line")
    device = next(model.parameters()).device
    src = torch.tensor([tokenizer.encode(line[:model.config.block_size])], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        newline = [tokenizer.stoi["\n"]] if "\n" in tokenizer.stoi else []
        out = model.generate(src, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                             never=newline)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0])


def main(argv: Sequence[str] | None = None) -> None:
    from model.checkpoint import load_checkpoint
    from model.cli import Parser, fail
    from model.config import ConfigError
    from model.data import DataError
    from model.train import resolve_device

    parser = Parser(prog="python -m model.sample", description="Generate text from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="directory holding ckpt.pt (or the file)")
    parser.add_argument("--prompt", help="text to continue (default for a GPT: a newline); for an "
                        "encoder-decoder checkpoint, required: the line whose next line to write")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely character")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k most likely (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}", parser.prog)
    if args.temperature < 0 or args.top_k < 0:
        fail("--temperature and --top-k must be >= 0", parser.prog)
    try:
        model, tokenizer, _ = load_checkpoint(args.checkpoint, resolve_device(args.device))
        lines = isinstance(model, EncoderDecoder)
        prompt = args.prompt if args.prompt is not None else ("" if lines else "\n")
        if lines and (not prompt or "\n" in prompt):
            raise DataError("--prompt must be one non-empty line for an encoder-decoder checkpoint")
        if not prompt:
            raise DataError("--prompt must not be empty")
        if tokenizer.unknown(prompt):
            raise DataError(f"--prompt has characters outside the checkpoint's vocabulary: "
                            f"{' '.join(repr(c) for c in tokenizer.unknown(prompt))}")
    except (ConfigError, DataError) as exc:
        fail(str(exc), parser.prog)
    if lines:
        print(next_line(model, tokenizer, prompt, args.temperature, args.top_k or None, args.seed,
                        args.max_new_tokens))
    else:
        print(sample_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                          args.seed))


if __name__ == "__main__":
    main()
