"""When to change shape: pure decision logic fed with (time, load sample), no I/O.

    samples ──EWMA──▶ smoothed load ──advisor──▶ best shape, predicted gain
                                                   │
        another shape better by ≥ margin ──────────┤ continuously for sustain_s
        and min_dwell_s since the last change ─────┴──▶ ShapeChange

The load is the number of requests in flight (running + waiting, summed over the replicas), the
quantity a closed-loop profile is indexed by. The margin is hysteresis in the load dimension (near a
crossover neither shape is 15% better, so noise there changes nothing); sustain_s filters spikes;
min_dwell_s bounds the change rate whatever the load does. The start counts as a change.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from scalellm.shape.profile import Profile
from scalellm.shape.shape import Machine, Shape

IDLE_LOAD = 1.0
"""The load shapes are ranked at when nothing is in flight: the next request runs alone."""


@dataclass(frozen=True)
class ControllerConfig:
    """How eagerly the controller changes shape."""

    margin: float = 0.15
    """Another shape must be predicted at least this much better (0.15 = 15%)."""
    sustain_s: float = 15.0
    """... continuously for this long."""
    min_dwell_s: float = 60.0
    """No change sooner than this after the previous one (or the start)."""
    smoothing_s: float = 2.0
    """Time constant of the exponentially weighted moving average of the load (0: none). It evens out
    the in-flight count's jitter; it also stretches a spike by a few time constants, so a load change
    shorter than about sustain_s - 3 smoothing_s changes nothing."""

    def __post_init__(self) -> None:
        for name in ("margin", "sustain_s", "min_dwell_s", "smoothing_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class LoadSample:
    """One poll of the replicas' load, summed over them."""

    num_running: int
    num_waiting: int
    num_arrived: int = 0
    """Requests that reached the replicas since the previous sample."""

    @property
    def num_in_flight(self) -> int:
        return self.num_running + self.num_waiting


@dataclass(frozen=True)
class Advice:
    """The shape an advisor prefers and how much better it predicts it to be than the current one."""

    best: Shape
    gain: float
    """Relative: 0.25 means 25% better than the current shape; 0 when `best` is the current shape."""
    detail: str
    """Why, for the log: the predicted figures."""


class ShapeAdvisor(ABC):
    """Ranks deployment shapes for a load.

    `advise(load, current)` is pure: for the smoothed number of requests in flight it names the best
    of `shapes` and its predicted relative gain over `current` (which may be outside `shapes`: then
    any shape of `shapes` is better, with an infinite gain). It knows nothing about time; the
    controller decides whether the advice has held long enough to act on.
    """

    shapes: tuple[Shape, ...]

    @abstractmethod
    def advise(self, load: float, current: Shape) -> Advice:
        """The best shape at `load` requests in flight, and its gain over `current`."""

    def initial_shape(self) -> Shape:
        """The shape to start with: the best one for a lone request."""
        return self.advise(IDLE_LOAD, self.shapes[0]).best


class ProfileAdvisor(ShapeAdvisor):
    """Ranks shapes by the output tokens/s the profile predicts at the load.

    One number serves both ends: in a closed loop of C requests, throughput = C / mean latency
    (Little's law), so at a given load the shape with the most tokens/s is also the one with the
    lowest mean latency per request. At low load that is the latency shape, at high load the
    throughput shape, wherever the profile puts the crossover.
    """

    def __init__(self, profile: Profile, machine: Machine) -> None:
        self.profile = profile
        self.shapes = tuple(entry.shape for entry in profile.shapes if machine.fits(entry.shape))
        if not self.shapes:
            raise ValueError(f"no shape of the profile fits this machine ({machine.num_units} "
                             f"{machine.device} units): profile it here with `scalellm profile`")

    def advise(self, load: float, current: Shape) -> Advice:
        scores = {shape: self.profile.get(shape).predict("output_throughput", load) for shape in self.shapes}
        best = max(self.shapes, key=lambda shape: (scores[shape], shape == current))
        if current not in scores:
            return Advice(best, math.inf, f"{current.label} is not in the profile; "
                                          f"{best.label} predicted {scores[best]:.0f} output tok/s")
        gain = scores[best] / scores[current] - 1.0 if scores[current] > 0 else math.inf
        detail = (f"profile predicts {best.label} {scores[best]:.0f} output tok/s vs "
                  f"{current.label} {scores[current]:.0f} ({gain:+.0%})")
        return Advice(best, gain, detail)


class CoreRuleAdvisor(ShapeAdvisor):
    """The rule used without a profile: one replica per request in flight, up to all cores (GPUs).

    The best shape has the most replicas r with r <= load (at least one replica). Fewer requests than
    replicas leave replicas idle while parallelism within a replica could have sped the requests up;
    more requests than replicas are served without the intra-op synchronization of wider replicas.
    The gain is how far the load is past the boundary: load / r_best - 1 when growing, r_current /
    load - 1 when shrinking, so the margin becomes a band around each boundary (with a 15% margin on
    two cores: 2x1 from 2.3 requests in flight, back to 1x2 below 1.74).
    """

    def __init__(self, machine: Machine) -> None:
        self.shapes = tuple(machine.feasible_shapes())

    def advise(self, load: float, current: Shape) -> Advice:
        load = max(load, IDLE_LOAD)
        best = max((s for s in self.shapes if s.replicas <= load), key=lambda s: s.replicas)
        if best == current:
            gain = 0.0
        elif current not in self.shapes:
            gain = math.inf
        elif best.replicas > current.replicas:
            gain = load / best.replicas - 1.0
        else:
            gain = current.replicas / load - 1.0
        return Advice(best, gain, f"rule: one replica per request in flight gives {best.label} "
                                  f"({gain:+.0%} past the boundary)")


class Ewma:
    """Exponentially weighted moving average over irregularly spaced samples (time constant tau)."""

    def __init__(self, time_constant_s: float) -> None:
        self.time_constant_s = time_constant_s
        self.value: float | None = None
        self._time = 0.0

    def update(self, now: float, sample: float) -> float:
        """Fold in `sample` taken at `now`; returns the new average (the first sample as is)."""
        if self.value is None or self.time_constant_s <= 0:
            self.value = float(sample)
        else:
            weight = 1.0 - math.exp(-max(0.0, now - self._time) / self.time_constant_s)
            self.value += weight * (sample - self.value)
        self._time = now
        return self.value


@dataclass(frozen=True)
class ShapeChange:
    """A decision to move from `source` to `target`, with the reason to log."""

    source: Shape
    target: Shape
    reason: str
    load: float
    gain: float


class ShapeController:
    """Turns a stream of load samples into shape changes (see the module docstring).

    Call `observe` with each sample; when it returns a `ShapeChange`, carry it out and report the
    outcome with `finish_change` (until then `observe` keeps smoothing but decides nothing).
    """

    def __init__(self, advisor: ShapeAdvisor, config: ControllerConfig, current: Shape, now: float) -> None:
        self.advisor = advisor
        self.config = config
        self.current = current
        self.load = Ewma(config.smoothing_s)
        self.waiting = Ewma(config.smoothing_s)
        self.arrival_rate = Ewma(config.smoothing_s)
        self._last_sample_time: float | None = None
        self._last_change_time = now
        self._better_since: float | None = None
        self._pending: ShapeChange | None = None

    @property
    def changing(self) -> bool:
        """True between a returned ShapeChange and its `finish_change`."""
        return self._pending is not None

    def observe(self, now: float, sample: LoadSample) -> ShapeChange | None:
        """Fold in one sample; returns a change when one is due."""
        load = self.load.update(now, sample.num_in_flight)
        self.waiting.update(now, sample.num_waiting)
        if self._last_sample_time is not None and now > self._last_sample_time:
            self.arrival_rate.update(now, sample.num_arrived / (now - self._last_sample_time))
        self._last_sample_time = now
        if self._pending is not None:
            return None
        advice = self.advisor.advise(load, self.current)
        if advice.best == self.current or advice.gain < self.config.margin:
            self._better_since = None
            return None
        if self._better_since is None:
            self._better_since = now
        sustained = now - self._better_since
        if sustained < self.config.sustain_s or now - self._last_change_time < self.config.min_dwell_s:
            return None
        self._pending = ShapeChange(self.current, advice.best, self._reason(load, sustained, advice),
                                    load, advice.gain)
        return self._pending

    def finish_change(self, now: float, ok: bool) -> None:
        """The pending change is done (`ok`) or was given up; either way the dwell time restarts."""
        if self._pending is None:
            raise RuntimeError("finish_change without a pending change")
        if ok:
            self.current = self._pending.target
        self._pending = None
        self._last_change_time = now
        self._better_since = None

    def _reason(self, load: float, sustained: float, advice: Advice) -> str:
        return (f"smoothed load {load:.1f} requests in flight ({self.waiting.value or 0.0:.1f} waiting, "
                f"{self.arrival_rate.value or 0.0:.2f} req/s arriving) for {sustained:.0f} s; {advice.detail}")
