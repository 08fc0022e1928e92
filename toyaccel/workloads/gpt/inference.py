"""The GPT's scoring and generation: the evaluation every epoch ends with, the book's ``generate``, and the GPT's
part of toyaccel-evaluate and toyaccel-generate (toyaccel.inference is the shell)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, SequentialSampler

from toyaccel.engine.batches import data_loader as _loader
from toyaccel.engine.evaluation import Leading
from toyaccel.engine.placement import choose_placement
from toyaccel.engine.workload import EvaluateRequest, GenerateRequest, SavedRun
from toyaccel.errors import ToyaccelError
from toyaccel.options import check_seed
from toyaccel.workloads.gpt import SYNTHETIC_CHARS
from toyaccel.workloads.gpt.shard_data import first_tokens, shard_validation_windows
from toyaccel.workloads.gpt.shards import ShardWindows, is_shard_folder
from toyaccel.workloads.gpt.text import perplexity, read_text, source_text, split_text
from toyaccel.workloads.gpt.token_ids import encode_compact
from toyaccel.workloads.gpt.windows import TextWindows

if TYPE_CHECKING:
    from toyaccel.config import TrainConfig

# Chapter 5 prints a greedy continuation of this after every epoch.
START_CONTEXT = "Every effort moves you"
SAMPLE_TOKENS = 50
# One forward pass per token: a million is hours on a CPU, and its ids and text still fit in memory.
MAX_NEW_TOKENS = 1_000_000
EVAL_WINDOWS = 8  # toyaccel-evaluate's default windows per process per batch


def prepared_eval_loader(accelerator, windows, config: TrainConfig, placement, count: int | None = None):
    """Every window once (the first ``count``), the tokens kept where ``placement`` keeps them, prepared: what
    the training's evaluation and toyaccel-evaluate read."""
    placed = placement.place(windows)
    # The loader's dataset is what is read: gather_for_metrics trims accelerate's padding by its length.
    return accelerator.prepare(eval_loader(placed if count is None else Leading(placed, count), config))


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


def generate_text(run: SavedRun, request: GenerateRequest) -> str:
    """The prompt and its continuation, as the book's generate (greedy when temperature is 0)."""
    prompt, max_new_tokens, context_length = request.prompt, request.max_new_tokens, request.context_length
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ToyaccelError(f"--max-new-tokens must be in 0..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    check_seed(request.seed, "--seed")
    if not (request.temperature >= 0.0 and request.temperature != float("inf")):
        raise ToyaccelError(f"--temperature must be 0 (greedy) or positive, got {request.temperature}")
    if request.top_k is not None and request.top_k < 1:
        raise ToyaccelError(f"--top-k must be at least 1, got {request.top_k}")
    tokenizer = run.extras
    table = run.saved["model"]["context_length"]
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
    generator = torch.Generator().manual_seed(request.seed)
    out = generate(run.model, torch.tensor([ids]), max_new_tokens, context_length, request.temperature,
                   request.top_k, generator)  # fmt: skip
    return tokenizer.decode(out[0].tolist())


def evaluation_set(run: SavedRun, request: EvaluateRequest) -> tuple[TextWindows | ShardWindows, dict[str, Any]]:
    """Every window of a text file (or of the run's own validation text, or a shard folder's validation
    split, read through the memory map, not tokenized again), and the data in words."""
    options, data = run.saved["config"], request.data
    context = run.saved["model"]["context_length"]
    if is_shard_folder(data or options["data"]):
        windows = shard_validation_windows(data or options["data"], run.saved)
        what = data or f"the run's validation shards in {options['data']}"
        return windows, {"data": f"{what} ({len(windows)} windows, {len(windows) * context} tokens)"}
    # A run on a file saves no num_samples (the synthetic text's length): --data synthetic then reads the default.
    num_chars = options.get("num_samples") or SYNTHETIC_CHARS
    if data is None:
        if options.get("val_data"):
            text, what = read_text(options["val_data"]), options["val_data"]
        elif options.get("val_fraction"):
            full = source_text(options["data"], num_chars, options["seed"])
            text, what = split_text(full, options["val_fraction"])[1], "the run's validation text"
        else:
            raise ToyaccelError(f"{run.run_dir} was trained without validation text; pass --data FILE.txt")
    else:
        text, what = source_text(data, num_chars, options["seed"]), data
    ids = encode_compact(run.extras, text)
    windows = TextWindows(ids, context, options.get("stride") or context)
    if len(windows) == 0:
        raise ToyaccelError(f"{what} is {ids.numel()} tokens, too short for one window of {context} plus its target")
    tokens = len(windows) * context  # what evaluate counts: every window once, each with context targets
    return windows, {"data": f"{what} ({len(windows)} windows, {tokens} tokens)"}


def evaluate_prepared(accelerator, model, windows, config: TrainConfig) -> dict[str, Any]:
    """The training's evaluation of the prepared model over ``windows``, kept where training keeps them."""
    loader = prepared_eval_loader(accelerator, windows, config, choose_placement([windows], accelerator.device, 0))
    return evaluate(accelerator, accelerator.prepare(model), loader)


def format_evaluation(metrics: dict[str, Any]) -> str:
    return f"evaluated on {metrics['data']}\nloss {metrics['loss']:.6f} | perplexity {metrics['perplexity']:.4f}"
