"""The order training sees its examples in: seeded, resumable passes of one-size batches."""
from __future__ import annotations

import random


class BatchOrder:
    """Shuffled passes of batches, every batch from one latent size; each image `repeats` times a pass; resumable.

    As kohya's buckets and AUTOMATIC1111's grouped sampler do: each pass shuffles the examples of
    each size, cuts them into batches of `batch_size` (the last of a size may be smaller), and
    shuffles the batches, so the order stays seeded while sizes never mix in one batch.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, repeats: int, seed: int):
        self.sizes, self.batch_size, self.repeats = list(sizes), batch_size, repeats
        self.rng = random.Random(seed)
        self.pending: list[list[int]] = []

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Example indices by latent size, sizes in sorted order (the order is part of the seeded result)."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(self.sizes):
            by_size.setdefault(tuple(size), []).append(index)
        return dict(sorted(by_size.items()))

    def small_buckets(self) -> dict[tuple[int, int], int]:
        """Sizes with fewer entries per pass than batch_size: their batches are smaller (kohya does the same)."""
        return {size: len(indices) * self.repeats for size, indices in self.buckets().items()
                if len(indices) * self.repeats < self.batch_size}

    def next_batch(self) -> list[int]:
        if not self.pending:
            self.pending = self._new_pass()
        return self.pending.pop()

    def _new_pass(self) -> list[list[int]]:
        batches = []
        for indices in self.buckets().values():
            entries = [i for i in indices for _ in range(self.repeats)]
            self.rng.shuffle(entries)
            batches += [entries[start:start + self.batch_size] for start in range(0, len(entries), self.batch_size)]
        self.rng.shuffle(batches)
        batches.reverse()  # popped from the end: the first batch of the pass is batches[0] of the shuffle
        return batches

    def state_dict(self) -> dict:
        return {"pending": [list(batch) for batch in self.pending], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pending = [list(batch) for batch in state["pending"]]
