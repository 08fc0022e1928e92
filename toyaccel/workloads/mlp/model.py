"""The book's multilayer perceptron (Appendix A, listing A.9)."""

from __future__ import annotations

import torch


class NeuralNetwork(torch.nn.Module):
    """The book's ``NeuralNetwork(num_inputs, num_outputs)``; ``hidden`` generalises its 30, 20.

    Linear and ReLU layers alternate inside ``self.layers``, so with the default hidden sizes the
    state_dict keys are the book's: ``layers.0.*``, ``layers.2.*``, ``layers.4.*``.
    """

    def __init__(self, num_inputs: int, num_outputs: int, hidden: tuple[int, ...] = (30, 20)):
        super().__init__()
        sizes = [num_inputs, *hidden]
        layers: list[torch.nn.Module] = []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(sizes[-1], num_outputs))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.layers(x)
        return logits
