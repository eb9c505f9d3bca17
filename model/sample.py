"""Text generation from a trained GPT: `sample_text` and `python -m model.sample`."""
from __future__ import annotations

from typing import Sequence

import torch

from model.data import CharTokenizer
from model.gpt import GPT


def sample_text(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: int | None = 200, seed: int = 1) -> str:
    """The prompt followed by max_new_tokens generated characters; the same seed gives the same text."""
    if not prompt:
        raise ValueError("prompt must not be empty")
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


def main(argv: Sequence[str] | None = None) -> None:
    from model.checkpoint import load_checkpoint
    from model.cli import Parser, fail
    from model.config import ConfigError
    from model.data import DataError
    from model.train import resolve_device

    parser = Parser(prog="python -m model.sample", description="Generate text from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="directory holding ckpt.pt (or the file)")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
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
        if not args.prompt:
            raise DataError("--prompt must not be empty")
        if tokenizer.unknown(args.prompt):
            raise DataError(f"--prompt has characters outside the checkpoint's vocabulary: "
                            f"{' '.join(repr(c) for c in tokenizer.unknown(args.prompt))}")
    except (ConfigError, DataError) as exc:
        fail(str(exc), parser.prog)
    print(sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                      args.top_k or None, args.seed))


if __name__ == "__main__":
    main()
