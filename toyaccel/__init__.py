"""toyaccel: the book's Appendix A MLP and chapter 4's GPT, trained with Hugging Face Accelerate on CPU,
GPU or many processes.

Public API::

    from toyaccel import TrainConfig, fit, load_model, NeuralNetwork, GPTModel, ToyaccelError
    result = fit(TrainConfig(epochs=3))          # same as `toyaccel-train --epochs 3`
    model = load_model(result.output_dir)        # from model.safetensors + config.json
    gpt = fit(TrainConfig(model="gpt", data="my_text.txt"))   # `toyaccel-train --model gpt --data ...`
"""

from toyaccel.config import TrainConfig
from toyaccel.engine.run_dir import load_model
from toyaccel.errors import ToyaccelError
from toyaccel.gpt_model import GPTModel
from toyaccel.model import NeuralNetwork

__version__ = "0.1.0"
__all__ = ["TrainConfig", "fit", "RunResult", "load_model", "NeuralNetwork", "GPTModel", "ToyaccelError", "__version__"]


def __getattr__(name):
    # fit and RunResult pull in accelerate; importing them lazily keeps `import toyaccel` light.
    if name in ("fit", "RunResult"):
        from toyaccel.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'toyaccel' has no attribute {name!r}")
