"""An exponential moving average of the trained tensors, evaluated in their place.

A zeroth-order step is mostly noise: with one random direction in d entries, its component along
the gradient is about 1/sqrt(d) of its length. Along the directions the loss curves in, the noise
does not pile up without end but makes the weights jitter around where the signal has brought
them, and that jitter is what makes dev accuracy wander from one evaluation to the next. Averaging
the iterates (Polyak-Ruppert; here an exponential average, so it follows a moving target) keeps
the signal, which every iterate shares, and averages the jitter away::

    a_0 = theta_0,        a_k = decay * a_{k-1} + (1 - decay) * theta_k

The average never feeds back into training: the optimizer steps the weights as before, and the
average is swapped in for evaluations only (dev, the best checkpoint, the final test). It costs
one buffer the size of the trained tensors (for full fine-tuning, a copy of the model: the
memory of a ZO run doubles) and, while swapped, one tensor's worth of scratch at a time.
``decay`` sets the window: the average's weight on the last ``1 / (1 - decay)`` steps is ~63 %,
and it lags the weights by about ``decay / (1 - decay)`` steps.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class IterateAverage:
    """``a <- decay a + (1 - decay) theta`` over ``named`` tensors, after every optimizer step."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay!r}")
        self.named = named
        self.decay = decay
        self.updates = 0
        with torch.no_grad():
            self.average = {k: p.detach().clone() for k, p in named.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights as they are now into the average (call once per optimizer step)."""
        for k, p in self.named.items():
            self.average[k].lerp_(p.detach(), 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for k, p in self.named.items():
            scratch = p.detach().clone()
            p.copy_(self.average[k])
            self.average[k].copy_(scratch)

    @contextmanager
    def swapped(self):
        """The average in the weights' place inside the block; the weights back after it, bit for bit."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def apply(self) -> None:
        """Leave the average in the weights' place for good (the end of a run)."""
        for k, p in self.named.items():
            p.copy_(self.average[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "average": dict(self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("decay") != self.decay:
            raise ValueError(f"the saved average has decay {state.get('decay')!r}, this one {self.decay!r}")
        saved = state["average"]
        if set(saved) != set(self.average):
            raise ValueError(f"the saved average holds {sorted(set(saved) ^ set(self.average))} that the other does not")
        for k, a in self.average.items():
            a.copy_(saved[k])
        self.updates = int(state["updates"])
