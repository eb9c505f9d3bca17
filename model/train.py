"""The training loop, `train(config, corpus, callbacks) -> TrainResult`, and `python -m model.train`."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from model.config import NAMED, ConfigError, TrainConfig
from model.data import Corpus
from model.tasks import make_task


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Callback(Protocol):
    """Listens to training; any method may raise to stop it (the exception propagates out of train).

    Each is optional. on_step runs before every training step and must be cheap: it is how a stop request ends a
    run between two steps.
    """

    def on_step(self, step: int) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


# A run's outcome, named once: these names are the MLflow metrics, the Optuna user attributes, the columns of
# trials.csv and comparison.csv, and the rows of the report, so one quantity reads the same everywhere.
OUTCOME = {
    "best_val_loss": "lowest val loss over the evals (what a study minimises)",
    "val_loss": "val loss at the last step",
    "train_loss": "train loss at the last step",
    "runtime_s": "seconds of training and evals, startup excluded",
    "startup_s": "seconds of compilation and first allocations",
    "tokens_per_s": "training throughput, evals and the first step excluded",
    "n_params": "parameters of the network",
}


@dataclass
class TrainResult:
    config: TrainConfig
    val_loss: float  # at the last step
    best_val_loss: float
    train_loss: float
    runtime_s: float  # the whole loop, evals included, startup excluded: what this configuration costs to train
    tokens_per_s: float  # training steps only: evals and the first (warm-up) step excluded
    startup_s: float  # compilation and first allocations: the first step's and first eval's time beyond the others
    n_params: int
    iters: int
    device: str
    precision: str  # bf16 or fp32, as run
    history: list[dict] = field(default_factory=list)  # one entry per eval: step + metrics
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # a GPT or an EncoderDecoder

    def outcome(self) -> dict:
        """The OUTCOME record of this run."""
        return {k: getattr(self, k) for k in OUTCOME}

    def summary(self) -> dict:
        return {**self.outcome(), "iters": self.iters, "device": self.device, "precision": self.precision}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32": what a config's precision means on this device.

    auto is bf16 where bf16 matmuls are native: CUDA, and CPUs with AVX512-BF16 or AMX instructions, on which they
    run 1.5x to 1.8x the speed of fp32 ones at the same losses (docs/benchmarks.md). Elsewhere bf16 is emulated.
    """
    if precision != "auto":
        return precision
    native = device.type == "cuda" or (device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                                                  or torch.cpu._is_amx_tile_supported()))
    return "bf16" if native else "fp32"


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast, or nothing for fp32.

    Under it the matmuls and the attention weights are bf16; weights, optimizer state, the residual stream, layer norms
    and the loss stay fp32.
    """
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at max_iters."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def startup_s(first_step_s: float, step_s: float, eval_times: list[float]) -> float:
    """One-off time: the first step and the first eval beyond an ordinary one (compiling their graphs, mostly).

    Kept out of runtime_s, so that a trial's runtime measures its configuration, not the state of compile caches.
    """
    extra = max(0.0, first_step_s - step_s)
    if len(eval_times) > 1:
        extra += max(0.0, eval_times[0] - statistics.median(eval_times[1:]))
    return extra


def train(config: TrainConfig, corpus: Corpus, callbacks: Sequence[Callback] = (), task=None) -> TrainResult:
    """Train config's network on corpus; task: what to train on, if not config.arch's own (model/tasks.py)."""
    if task is None:  # a task passed in brings its own batch and block sizes
        task = make_task(corpus, config)  # refuses a corpus the architecture cannot learn from
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    torch.manual_seed(config.seed)  # weights and dropout
    if cuda:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # whatever runs outside bf16 autocast
        torch.backends.cudnn.conv.fp32_precision = "tf32"

    # the corpus lives on the device and batches are drawn there: no host copies per step
    task.to(device)
    train_gen = torch.Generator(device=device).manual_seed(config.seed)
    eval_gen = torch.Generator(device=device).manual_seed(config.seed + 1)  # evals never shift training batches
    model = task.model(config).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(config.weight_decay), lr=config.learning_rate,
                                  betas=(config.beta1, config.beta2), fused=cuda)
    compiled = config.compile if config.compile is not None else cuda
    if compiled:
        # Each network starts from an empty compile cache: a study worker trains many shapes in one process,
        # and once dynamo's recompile limit (8 graphs per function) is reached it silently runs eager.
        torch._dynamo.reset()
    forward = torch.compile(model) if compiled else model
    autocast = autocast_for(config.precision, device)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.empty(config.eval_iters, device=device)
            for k in range(config.eval_iters):
                inputs, targets = task.batch(split, eval_gen)
                with autocast:
                    losses[k] = forward(*inputs, targets)[1]
            out[f"{split}_loss"] = losses.mean().item()
        model.train()
        return out

    # ---- loop ----
    callbacks = list(callbacks)
    step_hooks = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    history: list[dict] = []
    best_val = math.inf
    train_time, timed_steps, seg_steps, timed_tokens, seg_tokens = 0.0, 0, 0, 0, 0
    eval_times: list[float] = []
    loop_start = time.perf_counter()
    seg_start = first_step_s = None
    inputs, targets = task.batch("train", train_gen)
    for step in range(1, config.max_iters + 1):
        for hook in step_hooks:
            hook(step)
        lr = lr_at(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            _, loss = forward(*inputs, targets)
        tokens = sum(t.numel() for t in inputs)  # positions computed, padding included: B * T for the GPT
        inputs, targets = task.batch("train", train_gen)  # queued while the device works on this step
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if seg_start is None:  # the first step pays for allocation and compilation: keep it out of throughput
            _sync(device)
            seg_start = time.perf_counter()
            first_step_s, first_tokens = seg_start - loop_start, tokens
        else:
            seg_steps, seg_tokens = seg_steps + 1, seg_tokens + tokens
        if step % config.eval_interval and step != config.max_iters:
            continue

        # ---- eval (the only host synchronisation) ----
        _sync(device)
        train_time += time.perf_counter() - seg_start
        timed_steps, timed_tokens = timed_steps + seg_steps, timed_tokens + seg_tokens
        last_loss = loss.item()
        eval_start = time.perf_counter()
        metrics = estimate_loss()  # ends in .item(): synchronised
        eval_times.append(time.perf_counter() - eval_start)
        if not all(math.isfinite(v) for v in (last_loss, *metrics.values())):
            raise TrainingDiverged(f"loss became non-finite by step {step} "
                                   f"(batch loss {last_loss}, val loss {metrics['val_loss']})")
        best_val = min(best_val, metrics["val_loss"])
        tokens_per_s = timed_tokens / train_time if timed_tokens else first_tokens / first_step_s
        metrics.update(lr=lr, tokens_per_s=tokens_per_s, elapsed_s=time.perf_counter() - loop_start)
        history.append({"step": step, **metrics})
        for cb in callbacks:
            if hasattr(cb, "on_eval"):
                cb.on_eval(step, metrics)
        seg_start, seg_steps, seg_tokens = time.perf_counter(), 0, 0

    last = history[-1]
    startup = startup_s(first_step_s, train_time / timed_steps if timed_steps else 0.0, eval_times)
    result = TrainResult(config=config, val_loss=last["val_loss"], best_val_loss=best_val,
                         train_loss=last["train_loss"], runtime_s=time.perf_counter() - loop_start - startup,
                         tokens_per_s=last["tokens_per_s"], startup_s=startup, n_params=model.num_params(),
                         iters=config.max_iters, device=str(device),
                         precision=resolve_precision(config.precision, device), history=history, model=model)
    for cb in callbacks:
        if hasattr(cb, "on_train_end"):
            cb.on_train_end(result)
    return result


class PrintProgress:
    """Prints one line per eval."""

    def on_eval(self, step: int, m: dict[str, float]) -> None:
        print(f"step {step:>6}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
              f"lr {m['lr']:.2e}, {m['tokens_per_s']:,.0f} tokens/s", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    from model.checkpoint import save_checkpoint
    from model.cli import Parser, add_config_flags, config_overrides, fail
    from model.data import DataError, load_corpus

    parser = Parser(prog="python -m model.train", description="Train one character-level GPT, or with --arch "
                    "encoder-decoder an encoder-decoder Transformer that writes each line's next line.")
    parser.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: Tiny Shakespeare, downloaded)")
    parser.add_argument("--out", metavar="DIR", help="write the final checkpoint to DIR/ckpt.pt")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    parser.add_argument("--config", choices=list(NAMED), default="baby",
                        help="starting configuration, changed by the flags below (default: baby, the CPU recipe)")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = NAMED[args.config].replace(**config_overrides(args))
        resolve_device(config.device)
        corpus = load_corpus(args.data)
        task = make_task(corpus, config)
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise DataError(f"{args.out}: --out must be a directory, this is a file")
    except (ConfigError, DataError) as exc:
        fail(str(exc), parser.prog)

    print(task.describe(), flush=True)
    try:
        result = train(config, corpus, callbacks=[PrintProgress()], task=task)
    except TrainingDiverged as exc:
        print(f"{parser.prog}: error: training diverged: {exc}", file=sys.stderr)
        raise SystemExit(1)
    print(f"done: val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f}), {result.n_params:,} parameters, "
          f"{result.runtime_s:.1f} s (+{result.startup_s:.1f} s startup), {result.tokens_per_s:,.0f} tokens/s "
          f"on {result.device} in {result.precision}")
    if args.out:
        path = save_checkpoint(args.out, result.model, corpus.tokenizer, config, extra=result.summary())
        print(f"checkpoint: {path}")
    if args.json:
        print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
