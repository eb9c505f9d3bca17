"""Throughput benchmark: `python -m model.bench` prints ms/iter, tokens/s and MFU per named configuration.

Each configuration is timed two ways, alternating in one process so machine noise hits both alike:
`train()` itself (evals excluded, as it reports), and a bare forward/backward/AdamW loop over the same
network on a fixed batch. Their ratio is the training loop's overhead. Rows are measured in turn within each
repeat, and the last column compares each row's tokens/s with the first's (`--dropout 0 0.1`: dropout's cost;
`--precision fp32 bf16`: what bf16 autocast buys).
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from model.config import NAMED, PRECISIONS, TrainConfig
from model.data import load_corpus
from model.gpt import GPT
from model.train import _sync, autocast_for, resolve_device, resolve_precision, train

# dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
# (the first match wins: longer names before the names they contain)
PEAK_FLOPS = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12,
              "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU named as torch.cuda.get_device_name() names it; None when unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def flops_per_iter(config: TrainConfig, n_params: int) -> float:
    """Forward+backward FLOPs of one step (PaLM appendix B): 6 per parameter per token plus attention.

    Attention counts the whole T x T score matrix, as nanoGPT and PaLM do, though a causal kernel skips half.
    """
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    n_matmul = n_params - T * config.n_embd  # position embeddings are a lookup, not a matmul
    return (6 * n_matmul + 12 * L * H * Q * T) * T * config.batch_size


def bare_loop_tokens_per_s(config: TrainConfig, vocab_size: int, iters: int, warmup: int) -> float:
    """Forward, backward and AdamW on one fixed batch: the ceiling the training loop is measured against."""
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    torch.manual_seed(config.seed)
    model = GPT(config.model_config(vocab_size)).to(device)
    opt = torch.optim.AdamW(model.optimizer_groups(config.weight_decay), lr=config.learning_rate, fused=cuda)
    forward = torch.compile(model) if (config.compile if config.compile is not None else cuda) else model
    autocast = autocast_for(config.precision, device)
    x = torch.randint(vocab_size, (config.batch_size, config.block_size), device=device)
    y = torch.randint(vocab_size, (config.batch_size, config.block_size), device=device)
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        if config.grad_clip > 0:  # part of the step, as in train(): not loop overhead
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return iters * config.batch_size * config.block_size / (time.perf_counter() - start)


def measure(config: TrainConfig, corpus, iters: int) -> tuple[float, float, int]:
    """(train() tokens/s, bare loop tokens/s, parameters) of one repeat."""
    cfg = config.replace(max_iters=iters + 1, eval_interval=iters + 1, eval_iters=1, warmup_iters=0)
    result = train(cfg, corpus)
    return result.tokens_per_s, bare_loop_tokens_per_s(cfg, corpus.vocab_size, iters, warmup=3), result.n_params


def bench(rows: dict[str, TrainConfig], corpus, iters: int, repeats: int) -> None:
    """One line per row; each repeat measures every row in turn, so machine noise hits all rows alike."""
    runs = {name: [] for name in rows}
    for _ in range(repeats):
        for name, config in rows.items():
            runs[name].append(measure(config, corpus, iters))
    first = None
    for name, config in rows.items():
        tok_s, bare_tok_s = (statistics.median(r[i] for r in runs[name]) for i in (0, 1))
        n_params, first = runs[name][0][2], first or tok_s
        device = resolve_device(config.device)
        tokens_per_iter = config.batch_size * config.block_size
        peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        mfu = f"{flops_per_iter(config, n_params) * tok_s / tokens_per_iter / peak:6.1%}" if peak else "   n/a"
        print(f"{name:<30} {n_params / 1e6:6.2f}M  {device.type:<5} {1000 * tokens_per_iter / tok_s:9.2f} "
              f"{tok_s:12,.0f} {mfu}  {bare_tok_s:12,.0f} {tok_s / bare_tok_s:8.3f} {tok_s / first:8.3f}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    from model.cli import Parser, fail
    from model.config import ConfigError
    from model.data import DataError

    parser = Parser(prog="python -m model.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=[*NAMED, "all"], default=None,
                        help="default: all on CUDA, baby elsewhere")
    parser.add_argument("--data", metavar="PATH", help="corpus (default: Tiny Shakespeare)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements; medians are printed")
    parser.add_argument("--dropout", type=float, nargs="+", metavar="P",
                        help="one row per dropout probability, measured alternately (default: the config's own)")
    parser.add_argument("--precision", choices=PRECISIONS, nargs="+", metavar="P",
                        help="one row per precision, auto, fp32 or bf16, measured alternately (default: auto)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile (default: on for CUDA)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        parser.error("--iters and --repeats must be at least 1")
    try:
        device = resolve_device(args.device)
        corpus = load_corpus(args.data)
        configs = {name: NAMED[name].replace(device=args.device, compile=args.compile) for name in NAMED}
        names = [args.config] if args.config not in (None, "all") else list(NAMED)
        if args.config is None and device.type != "cuda":
            names = ["baby"]
        rows = {}
        for name in names:
            for p in args.dropout or [configs[name].dropout]:
                for precision in args.precision or ["auto"]:
                    label = " ".join([name, *([f"dropout={p:g}"] if args.dropout else []),
                                      *([resolve_precision(precision, device)] if args.precision else [])])
                    rows[label] = configs[name].replace(dropout=p, precision=precision)
        for config in rows.values():
            corpus.check_block_size(config.block_size)
    except (ConfigError, DataError) as exc:
        fail(str(exc), parser.prog)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    where += f", auto precision {resolve_precision('auto', device)}"
    print(f"torch {torch.__version__} on {where}; {args.iters} steps x {args.repeats} repeats, medians")
    print(f"{'config':<30} {'params':>7}  {'dev':<5} {'ms/iter':>9} {'tokens/s':>12} {'MFU':>6}  "
          f"{'bare tok/s':>12} {'loop/bare':>8} {'vs row 1':>8}")
    bench(rows, corpus, args.iters, args.repeats)


if __name__ == "__main__":
    main()
