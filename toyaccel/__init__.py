"""toyaccel: the book's Appendix A MLP and chapter 4's GPT, trained with Hugging Face Accelerate on CPU,
GPU or many processes.

Public API::

    from toyaccel import TrainConfig, fit, load_model, NeuralNetwork, GPTModel, ToyaccelError
    result = fit(TrainConfig(epochs=3))          # same as `toyaccel-train --epochs 3`
    model = load_model(result.output_dir)        # from model.safetensors + config.json
    gpt = fit(TrainConfig(model="gpt", data="my_text.txt"))   # `toyaccel-train --model gpt --data ...`
"""

import importlib

from toyaccel.config import TrainConfig
from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError
from toyaccel.workloads import register_workload

__version__ = "0.1.0"
__all__ = [
    "TrainConfig", "fit", "RunResult", "load_model", "NeuralNetwork", "GPTModel", "ToyaccelError", "Workload",
    "register_workload", "__version__",
]  # fmt: skip

# Imported on first use: they pull in torch (and fit, accelerate), and `toyaccel-train --help` needs neither.
LAZY = {
    "fit": "toyaccel.runner", "RunResult": "toyaccel.engine.run", "load_model": "toyaccel.saved",
    "NeuralNetwork": "toyaccel.workloads.mlp.model", "GPTModel": "toyaccel.workloads.gpt.model",
}  # fmt: skip


def __getattr__(name):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'toyaccel' has no attribute {name!r}")
