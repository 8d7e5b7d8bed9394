"""The shape controller on synthetic load traces: steps, ramps, noise, spikes; and its advisors."""

from __future__ import annotations

import math
import random

import pytest

from scalellm.shape.controller import (Advice, ControllerConfig, CoreRuleAdvisor, Ewma, LoadSample,
                                       ProfileAdvisor, ShapeAdvisor, ShapeController)
from scalellm.shape.profile import Profile, ProfilePoint, ShapeProfile
from scalellm.shape.shape import Machine, Shape

LATENCY, THROUGHPUT = Shape(1, 2), Shape(2, 1)
CONFIG = ControllerConfig(margin=0.15, sustain_s=15.0, min_dwell_s=60.0, smoothing_s=2.0)
TWO_CORES = Machine("cpu", 2)


def point(concurrency: int, tokens_per_s: float) -> ProfilePoint:
    return ProfilePoint(concurrency, tokens_per_s, tokens_per_s / 64, 10, 20, 5, 8, 100, 200)


def synthetic_profile() -> Profile:
    """1x2 wins by 30% alone, the two cross near C=3, 2x1 serves twice the tokens/s from C=16."""
    return Profile((ShapeProfile(LATENCY, (point(1, 40), point(4, 110), point(16, 160), point(64, 170))),
                    ShapeProfile(THROUGHPUT, (point(1, 30), point(4, 120), point(16, 320), point(64, 340)))),
                   device="cpu", num_units=2)


def run_trace(loads, controller: ShapeController, dt: float = 1.0, change_takes_s: float = 5.0):
    """Feed one sample per dt (load = requests in flight); returns [(time, target)] of the changes made."""
    changes, finish_at = [], None
    for step, load in enumerate(loads):
        now = step * dt
        if finish_at is not None and now >= finish_at:
            controller.finish_change(now, ok=True)
            finish_at = None
        change = controller.observe(now, LoadSample(int(load), 0, 0))
        if change is not None:
            changes.append((now, change.target))
            finish_at = now + change_takes_s
    return changes


def controller(start: Shape = LATENCY, config: ControllerConfig = CONFIG) -> ShapeController:
    return ShapeController(ProfileAdvisor(synthetic_profile(), TWO_CORES), config, start, now=0.0)


def test_step_up_changes_once_after_dwell_and_sustain():
    loads = [1] * 100 + [64] * 200
    changes = run_trace(loads, controller())
    assert [target for _, target in changes] == [THROUGHPUT]
    moment = changes[0][0]
    assert 100 + CONFIG.sustain_s <= moment <= 100 + CONFIG.sustain_s + 5  # a few s for the EWMA to cross


def test_step_up_early_waits_for_the_minimum_dwell():
    changes = run_trace([64] * 120, controller())
    assert changes == [(CONFIG.min_dwell_s, THROUGHPUT)]


def test_step_up_and_down_changes_twice():
    loads = [1] * 70 + [64] * 120 + [1] * 120
    targets = [target for _, target in run_trace(loads, controller())]
    assert targets == [THROUGHPUT, LATENCY]


def test_ramp_changes_once():
    loads = [1 + 63 * step / 300 for step in range(400)]
    assert [target for _, target in run_trace(loads, controller())] == [THROUGHPUT]


@pytest.mark.parametrize("seed", range(5))
def test_noise_around_the_crossover_never_flaps(seed):
    rng = random.Random(seed)
    loads = [max(0, round(rng.gauss(3, 1.2))) for _ in range(2000)]
    for start in (LATENCY, THROUGHPUT):
        assert run_trace(loads, controller(start)) == []


def test_noisy_high_load_changes_once():
    rng = random.Random(7)
    loads = [rng.randint(20, 64) for _ in range(600)]
    assert [target for _, target in run_trace(loads, controller())] == [THROUGHPUT]


def test_short_spike_changes_nothing():
    loads = [1] * 100 + [64] * 8 + [1] * 200
    assert run_trace(loads, controller()) == []


def test_repeated_spikes_shorter_than_sustain_change_nothing():
    loads = ([1] * 30 + [64] * 8) * 20
    assert run_trace(loads, controller()) == []


def test_changes_never_closer_than_the_dwell_time():
    rng = random.Random(3)
    loads = [rng.choice((1, 64)) for _ in range(40) for _ in range(30)]  # 30 s blocks at random
    moments = [moment for moment, _ in run_trace(loads, controller())]
    assert moments and all(b - a >= CONFIG.min_dwell_s for a, b in zip(moments, moments[1:]))


def test_no_decision_while_a_change_is_pending_and_a_failed_change_keeps_the_shape():
    control = controller()
    change = None
    for now in range(200):
        change = control.observe(float(now), LoadSample(60, 4, 3))
        if change is not None:
            break
    assert change is not None and change.source == LATENCY and control.changing
    assert "64.0 requests in flight" in change.reason and "2x1" in change.reason
    assert control.observe(now + 1.0, LoadSample(64, 0, 0)) is None
    control.finish_change(now + 2.0, ok=False)
    assert control.current == LATENCY and not control.changing
    assert control.observe(now + 3.0, LoadSample(64, 0, 0)) is None  # dwell restarts after a failure too
    with pytest.raises(RuntimeError):
        control.finish_change(now + 4.0, ok=True)


def test_reason_reports_the_waiting_requests_and_arrival_rate():
    control = controller(config=ControllerConfig(sustain_s=0, min_dwell_s=0, smoothing_s=0))
    assert control.observe(0.0, LoadSample(1, 0, 0)) is None
    change = control.observe(2.0, LoadSample(40, 24, 10))
    assert "64.0 requests in flight (24.0 waiting, 5.00 req/s arriving)" in change.reason


def test_profile_advisor_ranks_by_predicted_throughput():
    advisor = ProfileAdvisor(synthetic_profile(), TWO_CORES)
    assert advisor.initial_shape() == LATENCY
    low = advisor.advise(1.0, THROUGHPUT)
    assert low.best == LATENCY and low.gain == pytest.approx(40 / 30 - 1)
    high = advisor.advise(64.0, LATENCY)
    assert high.best == THROUGHPUT and high.gain == pytest.approx(340 / 170 - 1)
    assert "2x1 340 output tok/s vs 1x2 170 (+100%)" in high.detail
    assert advisor.advise(64.0, THROUGHPUT) == Advice(THROUGHPUT, 0.0, advisor.advise(64.0, THROUGHPUT).detail)
    assert advisor.advise(64.0, Shape(4, 1)).gain == math.inf  # not profiled: any profiled shape is better


def test_profile_advisor_uses_only_shapes_that_fit():
    with pytest.raises(ValueError, match="no shape of the profile fits"):
        ProfileAdvisor(synthetic_profile(), Machine("cpu", 1))
    assert ProfileAdvisor(synthetic_profile(), Machine("cpu", 16)).shapes == (LATENCY, THROUGHPUT)


@pytest.mark.parametrize("load, current, best, gain", [
    (0.0, THROUGHPUT, LATENCY, 1.0),      # idle: the next request runs alone
    (1.9, LATENCY, LATENCY, 0.0),
    (2.0, LATENCY, THROUGHPUT, 0.0),      # at the boundary: not past it yet
    (2.5, LATENCY, THROUGHPUT, 0.25),
    (1.6, THROUGHPUT, LATENCY, 0.25),
    (8.0, THROUGHPUT, THROUGHPUT, 0.0),
])
def test_core_rule_is_one_replica_per_request_in_flight(load, current, best, gain):
    advice = CoreRuleAdvisor(TWO_CORES).advise(load, current)
    assert advice.best == best and advice.gain == pytest.approx(gain)


def test_core_rule_on_four_cores_grows_through_the_middle_shape():
    advisor = CoreRuleAdvisor(Machine("cpu", 4))
    assert advisor.shapes == (Shape(1, 4), Shape(2, 2), Shape(4, 1))
    assert advisor.initial_shape() == Shape(1, 4)
    assert advisor.advise(3.0, Shape(1, 4)).best == Shape(2, 2)
    assert advisor.advise(5.0, Shape(1, 4)).best == Shape(4, 1)


def test_core_rule_trace_with_hysteresis_band():
    control = ShapeController(CoreRuleAdvisor(TWO_CORES), CONFIG, LATENCY, 0.0)
    assert run_trace([2] * 300, control) == []  # exactly one request per replica: not past the margin
    targets = [t for _, t in run_trace([1] * 70 + [6] * 100 + [1] * 100, control)]
    assert targets == [THROUGHPUT, LATENCY]


def test_ewma_follows_irregular_samples():
    average = Ewma(5.0)
    assert average.update(0.0, 10.0) == 10.0
    assert average.update(5.0, 0.0) == pytest.approx(10.0 * math.exp(-1))
    assert average.update(5.0, 100.0) == pytest.approx(10.0 * math.exp(-1))  # no time passed: no weight
    assert Ewma(0.0).update(1.0, 3.0) == 3.0 and Ewma(0.0).update(2.0, 7.0) == 7.0


@pytest.mark.parametrize("field", ["margin", "sustain_s", "min_dwell_s", "smoothing_s"])
def test_config_rejects_negative_values(field):
    with pytest.raises(ValueError, match=field):
        ControllerConfig(**{field: -1.0})


def test_advisor_contract_is_abstract():
    with pytest.raises(TypeError):
        ShapeAdvisor()
