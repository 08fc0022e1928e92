"""The book's chapters 4-5 workload: GPTModel pretrained on text with next-token cross-entropy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from toyaccel.engine.evaluation import eval_count
from toyaccel.engine.reporting import say
from toyaccel.engine.run_dir import write_atomic
from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError
from toyaccel.workloads.gpt import TOKENIZERS, inference
from toyaccel.workloads.gpt.hf_init import check_init_folder, load_init_weights
from toyaccel.workloads.gpt.inference import (
    EVAL_WINDOWS,
    SAMPLE_TOKENS,
    evaluate,
    generate,
    prepared_eval_loader,
    start_ids,
)
from toyaccel.workloads.gpt.model import GPT_CONFIG_KEYS, GPTModel, flops_per_token
from toyaccel.workloads.gpt.shard_data import ShardBundle, load_shard_data
from toyaccel.workloads.gpt.shards import is_shard_folder
from toyaccel.workloads.gpt.text import best_possible_loss
from toyaccel.workloads.gpt.tokenizers import load_tokenizer
from toyaccel.workloads.gpt.windows import TextBundle, load_text_data

if TYPE_CHECKING:
    from toyaccel.config import TrainConfig

# Vocabulary rows are padded to a multiple of this inside the model (see GPTModel), for GPU matrix products;
# on every device, so that the optimizer state in a checkpoint has the same shapes wherever it resumes.
VOCAB_MULTIPLE = 64


class GPTWorkload(Workload):
    name = "gpt"
    MODEL_KEYS = GPT_CONFIG_KEYS  # config.json's "model" section: the book's GPT_CONFIG dict
    eval_batch_size = EVAL_WINDOWS

    def load_data(self, config: TrainConfig) -> TextBundle | ShardBundle:
        # An --init-from folder is checked here, before the run writes anything; its tokenizer reads the text.
        folder_tokenizer = check_init_folder(config) if config.init_from else None
        if is_shard_folder(config.data):  # tokenized when prepared: its ids are checked against the vocabulary
            return load_shard_data(config)
        return load_text_data(config, folder_tokenizer)

    def model_shape(self, config: TrainConfig, data: TextBundle | None = None) -> dict[str, Any]:
        """The book's GPT_CONFIG dict."""
        return {k: getattr(config, k) for k in GPT_CONFIG_KEYS}

    def build_model(self, config: TrainConfig, data: TextBundle) -> GPTModel:
        model = GPTModel(self.model_shape(config, data), pad_vocab_to=VOCAB_MULTIPLE)
        if config.init_from:  # fine-tuning: the initial weights drawn above are replaced
            load_init_weights(model, config.init_from)
        return model

    def model_from_shape(self, shape: dict[str, Any]) -> GPTModel:
        return GPTModel(shape)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def uses_dropout(self, config: TrainConfig) -> bool:
        return config.drop_rate > 0

    def evaluator(self, accelerator, config: TrainConfig, data: TextBundle, placement):
        """What scores the model at an epoch's end: every training and validation window once (with
        --eval-batches M, the first M x --batch-size of each), kept where ``placement`` keeps the training
        tokens. The windows go through a prepared loader (gather_for_metrics trims accelerate's padding), not
        the MLP's row shares: its per-window sums make the figures the same for any number of processes."""
        sets = {"train": data.train} if data.val is None else {"train": data.train, "val": data.val}
        loaders = {name: prepared_eval_loader(accelerator, ds, config, placement, eval_count(len(ds), config))
                   for name, ds in sets.items()}  # fmt: skip
        return lambda model: {name: evaluate(accelerator, model, loader) for name, loader in loaders.items()}

    def epoch_fields(self, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        record = {}
        for name, m in metrics.items():
            record[f"{name}_loss"], record[f"{name}_ppl"] = m["loss"], m["perplexity"]
        return record

    def flops_per_sample(self, config: TrainConfig) -> float:
        """A window of context_length tokens, each 6N plus attention (flops_per_token): the engine's MFU."""
        return flops_per_token(self.model_shape(config)) * config.context_length

    def throughput(self, samples_per_s: float, config: TrainConfig) -> dict[str, float]:
        """A sample is a window of context_length tokens: language models are compared in tokens/s (the
        engine adds the MFU from flops_per_sample)."""
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

    def saved_shape_options(self, saved: dict[str, Any]) -> dict[str, Any]:
        # One synthetic character and SGD (no moments): the memory check counts the weights twice, as read
        # and as loaded, which is what loading needs.
        shape = {key: saved["model"][key] for key in GPT_CONFIG_KEYS}
        return {"model": "gpt", "data": "synthetic", "num_samples": 1, "optimizer": "sgd",
                "tokenizer": saved["tokenizer"]["type"], **shape}  # fmt: skip

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

    # A saved run (toyaccel.inference): workloads/gpt/inference.py does the work; the tokenizer is
    # what it reads beside the weights.
    def load_extras(self, run_dir: str, saved: dict[str, Any]):
        """The run's tokenizer (config.json's tokenizer section and its tokenizer.json)."""
        return load_tokenizer(saved.get("tokenizer", {}), Path(run_dir))

    evaluation_set = staticmethod(inference.evaluation_set)
    evaluate_prepared = staticmethod(inference.evaluate_prepared)
    format_evaluation = staticmethod(inference.format_evaluation)
    generate = staticmethod(inference.generate_text)


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
