"""The two model families on one task: `python -m model.bench_archs` trains the encoder-decoder and a GPT of about
the same parameter count for the same wall time on the next-line task (the GPT reads source, newline, target and is
scored on the target only), then prints each one's val loss per target character over the whole validation split
and the line each writes after the same source line."""
from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from model.config import TrainConfig
from model.data import load_corpus
from model.sample import next_line
from model.tasks import GPTNextLines, NextLines, count_params
from model.train import train


@torch.no_grad()
def val_loss_per_target_char(model, task: NextLines, batch: int = 64) -> float:
    """Cross-entropy summed over every target character (and line end) of the validation split, divided by their
    number: each character weighs the same, whatever its batch."""
    model.eval()
    total, count, n = 0.0, 0, len(task.splits["val"])
    for start in range(0, n, batch):
        inputs, targets = task.rows("val", torch.arange(start, min(n, start + batch)))
        logits = model(*inputs)[0]
        ignore = -100 if isinstance(task, GPTNextLines) else model.pad_id
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore, reduction="sum").item()
        count += int((targets != ignore).sum())
    return total / count


def gpt_next_line(model, tokenizer, line: str, temperature: float, seed: int) -> str:
    """The GPT's line after `line`: what it writes after line + newline, up to its next newline."""
    idx = torch.tensor([tokenizer.encode(line + "\n")])
    out = model.generate(idx, model.config.block_size - idx.size(1), temperature=temperature,
                         generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0, idx.size(1):].tolist()).split("\n")[0]


def same_size_gpt(ed: TrainConfig, vocab: int) -> TrainConfig:
    """The GPT config, at the encoder-decoder's width, whose depth brings its parameter count closest."""
    target = count_params(ed, vocab)
    # the GPT reads source and target as one sequence: twice the block, its position table counted
    return min((ed.replace(arch="gpt", n_layer=n) for n in range(1, 4 * ed.n_layer + 1)),
               key=lambda c: abs(count_params(c.replace(block_size=2 * c.block_size), vocab) - target))


def timed_run(config: TrainConfig, corpus, task, seconds: float) -> dict:
    """Calibrate steps per second on a short run, then train for about `seconds`, evals at quarters."""
    probe = train(config.replace(max_iters=30, eval_interval=30, eval_iters=1), corpus, task=task)
    iters = max(1, int(seconds * 30 / probe.runtime_s))
    start = time.perf_counter()
    result = train(config.replace(max_iters=iters, eval_interval=max(1, iters // 4)), corpus, task=task)
    return {"result": result, "wall_s": time.perf_counter() - start, "iters": iters}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.bench_archs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", metavar="PATH", help="corpus (default: Tiny Shakespeare)")
    parser.add_argument("--seconds", type=float, default=300, help="training time of each model (default: 300)")
    parser.add_argument("--source", default="ROMEO:", help="the source line both models write the next line of")
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args(argv)
    corpus = load_corpus(args.data)
    ed = TrainConfig(arch="encoder-decoder", device="cpu", learning_rate=2e-3)  # the baby's shape, each stack
    gpt = same_size_gpt(ed, corpus.vocab_size)
    rows = {}
    for name, config, task in (("encoder-decoder", ed, NextLines(corpus, ed)),
                               ("gpt", gpt, GPTNextLines(corpus, gpt))):
        run = timed_run(config, corpus, task, args.seconds)
        model = run["result"].model
        if name == "gpt":
            line = gpt_next_line(model, corpus.tokenizer, args.source, args.temperature, seed=1)
        else:
            line = next_line(model, corpus.tokenizer, args.source, args.temperature, seed=1)
        rows[name] = {"n_layer": config.n_layer, "n_params": model.num_params(), "iters": run["iters"],
                      "wall_s": round(run["wall_s"], 1), "tokens_per_s": round(run["result"].tokens_per_s),
                      "val_loss_per_target_char": round(val_loss_per_target_char(model, task), 4), "sample": line}
        print(json.dumps({"model": name, **rows[name]}), flush=True)
    print(f"\nafter {args.source!r}, each trained about {args.seconds:.0f} s on {torch.get_num_threads()} threads:")
    for name, r in rows.items():
        print(f"{name:16s} {r['n_params']:>10,} params  {r['iters']:>6} iters  val loss/target char "
              f"{r['val_loss_per_target_char']:.4f}  -> {r['sample']!r}")


if __name__ == "__main__":
    main()
