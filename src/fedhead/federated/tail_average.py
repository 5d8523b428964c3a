"""Tail averaging of the global model (`federated.tail_average_rounds`).

With a few label-skewed clients a round, the global model after any one round leans towards those clients'
labels, and its accuracy swings by several points from round to round; the model a run ends with is one draw of
that swing. The tail average is the uniform mean of the global trainable states after the last W rounds of the
run (Polyak-Ruppert averaging of the server's iterates; stochastic weight averaging, Izmailov et al. 2018):

    theta_bar = (1 / W) * sum_{t = R - W + 1}^{R} theta_t

where theta_t is the global trainable state after round t and R = federated.rounds. It changes nothing in training
(the clients always receive theta_t): it is a second, steadier model to deploy and to compare runs by. The running
sum is kept in float64 and checkpointed with the state (`fedhead.run_dir.Checkpoint`), so a resumed run ends with
the same average; a run extended to more rounds starts a new window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhead.federated.state import State


@dataclass
class TailAverage:
    """The running sum of the global states from round `start` on (`count` of them so far)."""

    start: int  # first averaged round: R - W + 1
    count: int = 0
    total: State = field(default_factory=dict)

    @classmethod
    def for_run(cls, rounds: int, window: int) -> TailAverage | None:
        """The accumulator of a run of `rounds` rounds averaging its last `window` (None when window is 0)."""
        if window <= 0:
            return None
        return cls(start=max(1, rounds - window + 1))

    def add(self, round_: int, state: State) -> None:
        """Count the global state after `round_` if the round is in the window."""
        if round_ < self.start:
            return
        for name, value in state.items():
            total = self.total.get(name)
            self.total[name] = value.double() if total is None else total + value.double()
        self.count += 1

    def complete(self, rounds: int) -> bool:
        """Whether every round of the window up to `rounds` has been added."""
        return self.count == rounds - self.start + 1 and self.count > 0

    def mean(self, like: State) -> State:
        """theta_bar, each tensor in the dtype of the same-named tensor of `like` (the global state)."""
        if not self.count:
            raise ValueError("the tail average holds no round yet")
        return {name: (total / self.count).to(like[name].dtype) for name, total in self.total.items()}

    @classmethod
    def resumed(cls, saved: TailAverage | None, rounds: int, window: int) -> TailAverage | None:
        """The accumulator of a resumed run of `rounds` rounds averaging its last `window`: the checkpoint's
        (`saved`) when it averages the same window, else a fresh one (a run extended to more rounds has a new
        window; a checkpoint without a sum starts counting anew, and a window it has already entered then stays
        incomplete)."""
        fresh = cls.for_run(rounds, window)
        if fresh is None or saved is None or saved.start != fresh.start:
            return fresh
        return cls(start=fresh.start, count=saved.count, total={k: v.double() for k, v in saved.total.items()})
