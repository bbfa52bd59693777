"""The one-epoch run with a learned bias in DigitCaps, as the official TensorFlow code has it.

    python docs/fashion-mnist-1epoch/digit_bias_experiment.py 0.1 runs/digit-bias-0.1

The defaults of `capsnet-fused train --epochs 1`, except that DigitCaps adds a bias [J, M]
(initialised to the first argument) to s before every squash. The fused ops take no bias, so
this routes with einsums (the "backend" in its metrics is the one the unused router would have
used). An experiment kept for reproducibility, not part of the package.
"""

import sys

import torch
from torch import nn

import capsnet_fused.train as train_module
import capsnet_fused.train.loop as train_loop
from capsnet_fused.reference import squash


class BiasedDigitCaps(nn.Module):
    def __init__(self, router, bias_init: float) -> None:
        super().__init__()
        self.weight = router.weight
        self.bias = nn.Parameter(torch.full((router.out_caps, router.out_d), bias_init))
        self.iterations = router.iterations

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u_hat = torch.einsum("bin,ijnm->bijm", u, self.weight)
        logits = u_hat.new_zeros(u_hat.shape[:3])
        for t in range(self.iterations):
            coupling = torch.softmax(logits, dim=2)
            v = squash(torch.einsum("bij,bijm->bjm", coupling, u_hat) + self.bias)
            if t < self.iterations - 1:
                logits = logits + torch.einsum("bijm,bjm->bij", u_hat, v)
        return v


def main() -> None:
    bias_init, out = float(sys.argv[1]), sys.argv[2]
    build_model = train_loop.build_model

    def build_biased_model(config, image_shape):
        model = build_model(config, image_shape)
        model.digit = BiasedDigitCaps(model.digit, bias_init)
        return model

    train_loop.build_model = build_biased_model  # where train() looks it up
    config = train_module.TrainConfig(dataset="fashion-mnist", epochs=1, out=out, progress=False)
    train_module.train(config)


if __name__ == "__main__":
    main()
