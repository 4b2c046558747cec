"""Resumable iteration: global batches of samples, and the step plans made from them.

Every rank builds the same loaders from the same samples and config, so every rank sees
the same global batch and the same :class:`~chunkflow.data.plan.StepPlan`, and picks its
own ``plan.rows_per_rank[dp_rank]``. Nothing is communicated.

Order of samples::

    epoch e:  perm_e = permutation of range(num_samples) drawn from SeedSequence([seed, e])
              batches perm_e[0:B], perm_e[B:2B], ..., the last incomplete batch dropped
    epoch e + 1 starts with a fresh permutation; iteration never ends

Dropping the remainder keeps every global batch exactly ``global_batch_size`` samples
(so the loss normaliser and the work per step stay comparable); with shuffling a
different remainder is dropped each epoch. ``shuffle=False`` uses dataset order.

State is two plain ints (epoch, batches already taken in it) plus the settings they
depend on, checked on load so a state is never applied to a different data order::

    {"epoch": 1, "index": 3, "seed": 1234, "global_batch_size": 16,
     "num_samples": 2048, "shuffle": True}
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from chunkflow.config.errors import ConfigError, UserError
from chunkflow.config.schema import SCHEDULES
from chunkflow.data.assignment import CostModel
from chunkflow.data.plan import StepPlan, plan_step
from chunkflow.data.types import Sample

__all__ = ["GlobalBatchLoader", "StepPlanLoader"]


class GlobalBatchLoader:
    """Endless iterator over global batches (lists of :class:`Sample`), resumable."""

    def __init__(
        self, samples: Sequence[Sample], *, global_batch_size: int, seed: int, shuffle: bool = True
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"data.global_batch_size={global_batch_size} must be >= 1")
        if len(samples) < global_batch_size:
            raise ConfigError(
                f"data.global_batch_size={global_batch_size} is larger than the dataset "
                f"({len(samples)} samples); use at most {len(samples)} or add data"
            )
        self.samples = samples
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.index = 0  # batches already taken in this epoch
        self._order: Optional[np.ndarray] = None  # permutation of the current epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.samples) // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (same on every rank and every run)."""
        if not self.shuffle:
            return np.arange(len(self.samples))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(len(self.samples))

    def __iter__(self) -> Iterator[list[Sample]]:
        return self

    def __next__(self) -> list[Sample]:
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        b = self.global_batch_size
        picked = self._order[self.index * b : (self.index + 1) * b]
        self.index += 1
        return [self.samples[int(i)] for i in picked]

    def next(self) -> list[Sample]:
        """The next global batch (same as ``next(loader)``)."""
        return self.__next__()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.samples),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved ``state`` stopped."""
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("num_samples", len(self.samples)), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise UserError(
                    f"data loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={mine!r}; resume with the same data settings"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"invalid data loader state: epoch={epoch}, index={index}")
        self.epoch, self.index, self._order = epoch, index, None


class StepPlanLoader:
    """Endless iterator of :class:`StepPlan` for one schedule, resumable.

    Planning is a pure function of the global batch, so the state is the batch loader's
    state; resuming from it yields exactly the plans an uninterrupted run yields next.
    """

    def __init__(
        self,
        batches: GlobalBatchLoader,
        *,
        schedule: str,
        dp_size: int,
        max_seq_len: int,
        chunk_size: int,
        cost_model: Optional[CostModel] = None,
        balance: str = "lpt",
        equalize: bool = False,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
        self.batches = batches
        self.schedule = schedule
        self.plan_kwargs = dict(
            schedule=schedule, dp_size=dp_size, max_seq_len=max_seq_len, chunk_size=chunk_size,
            cost_model=cost_model, balance=balance, equalize=equalize,
        )
        self.step = 0  # plans produced so far (informational; restored with the state)

    @classmethod
    def from_config(
        cls, cfg: Any, samples: Sequence[Sample], *, dp_size: int, equalize: bool = False
    ) -> "StepPlanLoader":
        """Loader for ``cfg.train.schedule`` with the cost model of ``cfg.model``."""
        d = cfg.data
        batches = GlobalBatchLoader(
            samples, global_batch_size=d.global_batch_size, seed=d.seed, shuffle=d.shuffle
        )
        return cls(
            batches, schedule=cfg.train.schedule, dp_size=dp_size, max_seq_len=d.max_seq_len,
            chunk_size=cfg.chunkflow.chunk_size, cost_model=CostModel.from_model_config(cfg.model),
            equalize=equalize,
        )

    def __iter__(self) -> Iterator[StepPlan]:
        return self

    def __next__(self) -> StepPlan:
        plan = plan_step(next(self.batches), **self.plan_kwargs)
        self.step += 1
        return plan

    def next(self) -> StepPlan:
        """The next step's plan (same as ``next(loader)``)."""
        return self.__next__()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "schedule": self.schedule, "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the batch position. The saved ``schedule`` is informational: the global
        batches do not depend on it, so a run may resume under the other schedule."""
        self.batches.load_state_dict(state["batches"])
        self.step = int(state.get("step", 0))
