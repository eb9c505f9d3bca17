"""The tuned GPT as an MLflow pyfunc model ("models from code"): a DataFrame of prompts in, generated texts out.

MLflow runs this file when it loads the model, with the project's `model` package on the path (logged as code),
so it imports nothing from `study/`. The weights are the project's checkpoint, loaded with weights_only=True;
generation is model/sample.py's, which crops the context to block_size at every step, so any length works
(an exported graph would be fixed to one sequence length).
"""
from __future__ import annotations

import math

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from model.checkpoint import load_checkpoint
from model.sample import sample_text

CHECKPOINT_ARTIFACT = "checkpoint"
OPTIONS = {"max_new_tokens": int, "temperature": float, "top_k": int, "seed": int}  # optional columns and params
# Characters one request may ask for, all its rows together: a served model answers others while it generates, and
# one request for millions of characters would hold it for hours (the baby GPT writes about a thousand a second on
# a CPU core, so the cap is seconds of work).
MAX_NEW_TOKENS_PER_REQUEST = 10_000


class CharGPTModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer, _ = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """One text per row: its prompt followed by max_new_tokens generated characters.

        A row's own settings win over the request's params, which default to the study's sample settings.
        """
        rows = [(row, self._options(row, params or {})) for row in model_input.to_dict("records")]
        asked = sum(opts["max_new_tokens"] for _, opts in rows)
        if asked > MAX_NEW_TOKENS_PER_REQUEST:  # MlflowException: the scoring server answers 400 with this message
            raise MlflowException.invalid_parameter_value(
                f"max_new_tokens: this request asks for {asked} characters; a request may ask for at most "
                f"{MAX_NEW_TOKENS_PER_REQUEST} (all its rows together)")
        return [sample_text(self.model, self.tokenizer, row["prompt"], opts["max_new_tokens"], opts["temperature"],
                            opts["top_k"] or None, opts["seed"])  # top_k 0: all characters, as in model/sample.py
                for row, opts in rows]

    def _options(self, row: dict, params: dict) -> dict:
        """The row's checked prompt and generation settings."""
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise MlflowException.invalid_parameter_value(f"prompt must be a non-empty string, got {prompt!r}")
        unknown = self.tokenizer.unknown(prompt)
        if unknown:  # MlflowException: the scoring server answers 400 with this message
            raise MlflowException.invalid_parameter_value(
                f"prompt {prompt[:40]!r} has characters outside the model's vocabulary: {' '.join(map(repr, unknown))}")
        opts = {k: _option(row, params, k, cast) for k, cast in OPTIONS.items()}
        if min(opts.values()) < 0:
            raise MlflowException.invalid_parameter_value(
                f"max_new_tokens, temperature, top_k and seed must be >= 0, got {opts}")
        return opts


def _option(row: dict, params: dict, name: str, cast):
    """The row's value, else the params' (a column that some records leave out is None or NaN in their rows)."""
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return params[name]
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise MlflowException.invalid_parameter_value(f"{name} must be a number, got {value!r}") from None


mlflow.models.set_model(CharGPTModel())
