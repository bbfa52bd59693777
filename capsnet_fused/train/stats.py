"""The sums an epoch's record (or an evaluation's result) is computed from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochStats:
    """Sums over the batches of a training epoch, or of an evaluation; under DDP, over all
    processes.

    to_list gives them as the list a checkpoint stores (its "epoch_sums": loss_sum, correct,
    images, seconds, processed, then the part sums, which only an evaluation has) and the one
    _all_sum adds up over processes; from_list reads it back.
    """

    loss_sum: float = 0.0  # batch loss x images processed, summed over batches
    correct: float = 0.0  # correct predictions among the counted images
    images: float = 0.0  # images counted (without the sampler's padding)
    seconds: float = 0.0  # training time (the steps only; not the evaluation)
    processed: float = 0.0  # images processed (with the padding)
    part_sums: list[float] = field(default_factory=list)  # the loss parts x images, summed

    def to_list(self) -> list[float]:
        return [
            self.loss_sum,
            self.correct,
            self.images,
            self.seconds,
            self.processed,
            *self.part_sums,
        ]

    @classmethod
    def from_list(cls, sums: list[float]) -> EpochStats:
        loss_sum, correct, images, seconds, processed, *part_sums = sums
        return cls(loss_sum, correct, images, seconds, processed, part_sums)

    def __add__(self, other: EpochStats) -> EpochStats:
        """The element-wise sum (the part sums must be as many)."""
        pairs = zip(self.to_list(), other.to_list(), strict=True)
        return EpochStats.from_list([a + b for a, b in pairs])
