"""The random streams of a training run, each seeded from train.seed by a named, fixed offset.

Each stream has one job, so adding draws to one (say, a new caption augmentation) leaves every
other stream, and so the rest of the run, unchanged. All are saved in the resume state.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RandomStreams:
    seed: int  # train.seed

    @property
    def noise(self) -> int:
        """torch.Generator: the noise, the timesteps and `random` latent samples of every step."""
        return self.seed

    @property
    def captions(self) -> int:
        """random.Random: template lines, tag shuffling and tag/caption dropout."""
        return self.seed + 1

    @property
    def once_samples(self) -> int:
        """`once` latent sampling: one fixed sample per image, drawn from this seed and the image's index."""
        return self.seed + 2

    @property
    def probe(self) -> int:
        """The fixed (image, noise, timestep) probe behind the train log's 'loss on fixed noise'."""
        return self.seed + 3

    @property
    def data_order(self) -> int:
        """random.Random: the shuffled passes of one-size batches."""
        return self.seed
