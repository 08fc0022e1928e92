"""The book's chapters 4-5 workload: GPTModel pretrained on text with next-token cross-entropy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, SequentialSampler

from toyaccel.config import TOKENIZERS, WORKLOAD_DEFAULTS, TrainConfig, build_config, check_seed
from toyaccel.engine.batches import data_loader as _loader
from toyaccel.engine.launch import launched_world_size
from toyaccel.engine.placement import choose_placement
from toyaccel.engine.reporting import say
from toyaccel.engine.run_dir import write_atomic
from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError
from toyaccel.gpt_model import GPT_CONFIG_KEYS, GPTModel
from toyaccel.saved import load_model, read_run_config
from toyaccel.shard_data import ShardBundle, first_tokens, load_shard_data, shard_validation_windows
from toyaccel.shards import is_shard_folder
from toyaccel.text import (
    TextBundle,
    TextWindows,
    best_possible_loss,
    encode_compact,
    load_text_data,
    load_tokenizer,
    perplexity,
    read_text,
    source_text,
    split_text,
)
from toyaccel.workloads import workload_of_run

# Chapter 5 prints a greedy continuation of this after every epoch.
START_CONTEXT = "Every effort moves you"
SAMPLE_TOKENS = 50
# One forward pass per token: a million is hours on a CPU, and its ids and text still fit in memory.
MAX_NEW_TOKENS = 1_000_000
EVAL_WINDOWS = 8  # toyaccel-evaluate's default windows per process per batch

# Vocabulary rows are padded to a multiple of this inside the model (see GPTModel), for GPU matrix products;
# on every device, so that the optimizer state in a checkpoint has the same shapes wherever it resumes.
VOCAB_MULTIPLE = 64


class GPTWorkload(Workload):
    name = "gpt"
    MODEL_KEYS = GPT_CONFIG_KEYS  # config.json's "model" section: the book's GPT_CONFIG dict

    def load_data(self, config: TrainConfig) -> TextBundle | ShardBundle:
        return load_shard_data(config) if is_shard_folder(config.data) else load_text_data(config)

    def model_shape(self, config: TrainConfig, data: TextBundle | None = None) -> dict[str, Any]:
        """The book's GPT_CONFIG dict."""
        return {k: getattr(config, k) for k in GPT_CONFIG_KEYS}

    def build_model(self, config: TrainConfig, data: TextBundle) -> GPTModel:
        return GPTModel(self.model_shape(config, data), pad_vocab_to=VOCAB_MULTIPLE)

    def model_from_shape(self, shape: dict[str, Any]) -> GPTModel:
        return GPTModel(shape)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def uses_dropout(self, config: TrainConfig) -> bool:
        return config.drop_rate > 0

    def evaluator(self, accelerator, config: TrainConfig, data: TextBundle, placement):
        """What scores the model at an epoch's end: every training and validation window once, kept where
        ``placement`` keeps the training tokens. The windows go through a prepared loader (gather_for_metrics
        trims accelerate's padding), not the MLP's row shares: its per-window sums make the figures the same
        for any number of processes."""
        sets = {"train": data.train} if data.val is None else {"train": data.train, "val": data.val}
        loaders = {name: prepared_eval_loader(accelerator, ds, config, placement) for name, ds in sets.items()}
        return lambda model: {name: evaluate(accelerator, model, loader) for name, loader in loaders.items()}

    def epoch_fields(self, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        record = {}
        for name, m in metrics.items():
            record[f"{name}_loss"], record[f"{name}_ppl"] = m["loss"], m["perplexity"]
        return record

    def throughput(self, samples_per_s: float, config: TrainConfig) -> dict[str, float]:
        """A sample is a window of context_length tokens: language models are compared in tokens/s."""
        return {"tokens_per_s": samples_per_s * config.context_length}

    def result_metrics(self, metrics: dict[str, dict[str, Any]], samples_per_s: float, config: TrainConfig):
        return {
            "val_perplexity": metrics["val"]["perplexity"] if "val" in metrics else None,
            "train_perplexity": metrics["train"]["perplexity"],
            **self.throughput(samples_per_s, config),
            "best_possible_loss": best_possible_loss(config),
        }

    def run_description(self, config: TrainConfig, data: TextBundle) -> dict[str, Any]:
        return {
            "model": self.model_shape(config, data),
            "tokenizer": {"type": data.tokenizer.kind, "size": data.tokenizer.size},
            "data": {"source": data.source, "train_tokens": data.train.num_tokens,
                     "val_tokens": data.val.num_tokens if data.val is not None else 0},
        }  # fmt: skip

    def check_run_description(self, saved: dict[str, Any]) -> None:
        check_run_description(saved)

    def describe_data(self, data: TextBundle) -> str:
        """``data synthetic: bytes tokenizer (256 tokens); train 351 windows of 128 tokens (45000 tokens), ...``"""
        windows = data.train.context_length
        words = f"data {data.source}: {data.tokenizer.kind} tokenizer ({data.tokenizer.size} tokens); "
        words += f"train {len(data.train)} windows of {windows} tokens ({data.train.num_tokens} tokens)"
        if data.val is not None:
            words += f", val {len(data.val)} windows ({data.val.num_tokens} tokens)"
        if data.best_loss is not None:
            words += f"; best possible loss {data.best_loss:.4f} (the text's entropy per token)"
        return words

    def save_extras(self, output_dir: str, data: TextBundle) -> None:
        """tokenizer.json: with config.json, all toyaccel-generate needs (a gpt2 run names tiktoken's)."""
        write_atomic(Path(output_dir) / "tokenizer.json", lambda p: Path(p).write_text(data.tokenizer.to_json()))

    def after_epoch(self, accelerator, model, config: TrainConfig, data: TextBundle) -> dict[str, Any]:
        """Chapter 5's greedy sample from the start context, printed and logged by the main process. Every
        process generates it: under FSDP each forward pass gathers the parameter shards from all of them, so
        a forward on the main process alone would wait forever. Greedy decoding of a fixed length makes the
        same number of forward passes everywhere, and draws no random numbers, so the data order of the next
        epoch does not depend on it."""
        from accelerate.utils import DistributedType

        # FSDP's wrapper is what gathers the shards; elsewhere the plain module does the same maths without
        # DDP's hooks, and without torch.compile recompiling for every length of the growing sample.
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        net = model if fsdp else accelerator.unwrap_model(model, keep_torch_compile=False)
        ids = start_ids(data.tokenizer, data.train)
        device = next(net.parameters()).device
        out = generate(net, torch.tensor([ids], device=device), SAMPLE_TOKENS, config.context_length)
        sample = data.tokenizer.decode(out[0].tolist())
        say(accelerator, f"sample: {sample!r}")
        return {"sample": sample}


def prepared_eval_loader(accelerator, windows, config: TrainConfig, placement):
    """Every window once, the tokens kept where ``placement`` keeps them, prepared: what the training's
    evaluation and toyaccel-evaluate read."""
    return accelerator.prepare(eval_loader(placement.place(windows), config))


def eval_loader(windows, config: TrainConfig, batch_size: int | None = None):
    """Every window once, in order; accelerate pads the last round and gather_for_metrics trims it."""
    sampler = BatchSampler(SequentialSampler(range(len(windows))), batch_size or config.batch_size, False)
    return _loader(windows, sampler, config)


@torch.no_grad()
def evaluate(accelerator, model, loader) -> dict[str, Any]:
    """Token-weighted cross-entropy over every window exactly once, and its perplexity."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = 0
    for inputs, targets in loader:
        logits = model(inputs).float()
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        # Per-window sums, gathered: gather_for_metrics drops the windows accelerate repeated to give
        # every process a full batch, and float64 sums of float32 terms do not depend on their order.
        window_sums = accelerator.gather_for_metrics(per_token.view(targets.shape).sum(dim=1, dtype=torch.float64))
        loss_sum += window_sums.sum()
        tokens += window_sums.numel() * targets.shape[1]  # every window holds context_length targets
    model.train()
    mean = loss_sum.item() / tokens
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": tokens}


def check_run_description(saved: dict[str, Any]) -> None:
    """config.json's model and tokenizer sections, by the rules of the training options (its caller names the
    file): the model section holds the same options as the command line."""
    tokenizer = saved.get("tokenizer")
    kind = tokenizer.get("type") if isinstance(tokenizer, dict) else None
    if kind not in TOKENIZERS:
        raise ToyaccelError(f"tokenizer: type must be one of {', '.join(TOKENIZERS)}, got {kind!r:.80}")
    shape = saved["model"]
    missing = [key for key in GPT_CONFIG_KEYS if key not in shape]
    if missing:
        raise ToyaccelError(f"model: {missing[0]} is missing")
    try:
        # One synthetic character and SGD (no moments): the memory check counts the weights twice, as read
        # and as loaded, which is what loading needs.
        TrainConfig(model="gpt", data="synthetic", num_samples=1, optimizer="sgd", tokenizer=kind,
                    **{key: shape[key] for key in GPT_CONFIG_KEYS})  # fmt: skip
    except ToyaccelError as e:
        raise ToyaccelError(f"model: {e}") from None


def start_ids(tokenizer, train) -> list[int]:
    """The book's start context where the vocabulary has it, else the training text's first tokens."""
    try:
        tokenizer.check_prompt(START_CONTEXT)
        return tokenizer.encode(START_CONTEXT)
    except Exception:  # noqa: BLE001 - a byte vocabulary without these letters
        return first_tokens(train, 8)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """The book's ``generate`` (chapter 5): greedy at temperature 0 (``generate_text_simple``), else
    sampled from the temperature-scaled softmax of the ``top_k`` largest logits."""
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :].float()
        if top_k:
            top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            logits = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf"), device=logits.device), logits)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(idx.device)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    model.train(was_training)
    return idx


# ---------------------------------------------------------------------------------------------
# A saved run: generate and evaluate (toyaccel-generate, toyaccel-evaluate)


def load_gpt_run(run_dir: str | Path):
    """The model, tokenizer and config.json of a saved ``--model gpt`` run."""
    saved = read_run_config(run_dir)
    if workload_of_run(saved) != "gpt":
        raise ToyaccelError(
            f"{run_dir} holds a {workload_of_run(saved)} run; toyaccel-generate needs a --model gpt run"
        )
    return load_model(run_dir), load_tokenizer(saved.get("tokenizer", {}), Path(run_dir)), saved


def generate_from_run(
    run_dir: str | Path, prompt: str = START_CONTEXT, max_new_tokens: int = SAMPLE_TOKENS, temperature: float = 0.0,
    top_k: int | None = None, seed: int = 123, context_length: int | None = None,
) -> str:  # fmt: skip
    """The prompt and its continuation, as the book's generate (greedy when temperature is 0)."""
    if launched_world_size() > 1:
        raise ToyaccelError("generate runs in one process: start it with python or toyaccel-generate, not a launch")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ToyaccelError(f"--max-new-tokens must be in 0..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    check_seed(seed, "--seed")
    if not (temperature >= 0.0 and temperature != float("inf")):
        raise ToyaccelError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ToyaccelError(f"--top-k must be at least 1, got {top_k}")
    model, tokenizer, saved = load_gpt_run(run_dir)
    table = saved["model"]["context_length"]
    context_length = table if context_length is None else context_length
    if not 1 <= context_length <= table:
        raise ToyaccelError(
            f"--context-length {context_length} is beyond the model's position table of {table} tokens "
            f"(its context_length); use 1..{table}"
        )
    tokenizer.check_prompt(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ToyaccelError("the prompt is empty: give at least one character with --prompt")
    generator = torch.Generator().manual_seed(seed)
    out = generate(model, torch.tensor([ids]), max_new_tokens, context_length, temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())


def evaluate_text_run(run_dir: str | Path, data: str | None, batch_size: int | None) -> dict[str, Any]:
    """Loss and perplexity of a saved GPT on a text file (or its own validation text), every window
    once; under ``accelerate launch`` the processes share the windows and report the same figures."""
    from toyaccel.engine.accelerator import on_accelerator

    model, tokenizer, saved = load_gpt_run(run_dir)
    options = saved["config"]
    # A run on a file saves no num_samples (the synthetic text's length): --data synthetic then reads the default.
    num_chars = options.get("num_samples") or WORKLOAD_DEFAULTS["gpt"]["num_samples"]
    if is_shard_folder(data or options["data"]):  # read through the memory map, not tokenized again
        dataset = shard_validation_windows(data or options["data"], saved)
        text, what = None, data or f"the run's validation shards in {options['data']}"
    elif data is None:
        if options.get("val_data"):
            text, what = read_text(options["val_data"]), options["val_data"]
        elif options.get("val_fraction"):
            full = source_text(options["data"], num_chars, options["seed"])
            text, what = split_text(full, options["val_fraction"])[1], "the run's validation text"
        else:
            raise ToyaccelError(f"{run_dir} was trained without validation text; pass --data FILE.txt")
    else:
        text, what = source_text(data, num_chars, options["seed"]), data
    if text is not None:
        context = saved["model"]["context_length"]
        ids = encode_compact(tokenizer, text)
        dataset = TextWindows(ids, context, options.get("stride") or context)
        if len(dataset) == 0:
            raise ToyaccelError(
                f"{what} is {ids.numel()} tokens, too short for one window of {context} plus its target"
            )
    batch_size = EVAL_WINDOWS if batch_size is None else batch_size
    config = build_config(None, model="gpt", batch_size=batch_size, output_dir=str(run_dir))
    metrics = on_accelerator(config, evaluate_prepared, model, dataset, config)
    return {"data": f"{what} ({len(dataset)} windows, {metrics['tokens']} tokens)", **metrics}


def evaluate_prepared(accelerator, model, windows, config: TrainConfig) -> dict[str, Any]:
    """The training's evaluation of the prepared model over ``windows``, kept where training keeps them."""
    loader = prepared_eval_loader(accelerator, windows, config, choose_placement([windows], accelerator.device, 0))
    return evaluate(accelerator, accelerator.prepare(model), loader)


def format_evaluation(metrics: dict[str, Any]) -> str:
    return f"evaluated on {metrics['data']}\nloss {metrics['loss']:.6f} | perplexity {metrics['perplexity']:.4f}"
