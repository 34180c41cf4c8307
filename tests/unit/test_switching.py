"""The SLO-aware variant selector (meshserve.common.routing.switching) on constructed
states (pure)."""

from __future__ import annotations

import math

import pytest

from meshserve.common.errors import FailedPrecondition
from meshserve.common.routing.switching import (
    Calibration,
    CopyLoad,
    Switcher,
    VariantOption,
    choose_variant,
    predict_seconds,
)
from meshserve.protos import mesh_pb2

T = 0.0005  # transport used in these tests


def option(variant: str, accuracy: float, run_s: float, queued: int = 0) -> VariantOption:
    spec = mesh_pb2.ModelSpec(name="digits", variant=variant, accuracy=accuracy)
    copy = CopyLoad(node_id="n1", profile={1: run_s}, queued=queued, batched=False)
    return VariantOption(spec, [copy])


def test_predictions_follow_profile_queue_batching_and_parallelism() -> None:
    plain = CopyLoad("n", {1: 0.010}, queued=3, batched=False, parallel=2)
    assert predict_seconds(plain, T) == pytest.approx(2 * 0.010 + T)
    batched = CopyLoad("n", {1: 0.010, 8: 0.030}, queued=5, batched=True, max_batch=8)
    assert predict_seconds(batched, T) == pytest.approx(0.010 + 5 / 7 * 0.020 + T)
    beyond = CopyLoad("n", {1: 0.010, 8: 0.030}, queued=19, batched=True, max_batch=16)
    assert predict_seconds(beyond, T) == pytest.approx(2 * 0.030 * 16 / 8 + T)
    fallback = CopyLoad("n", {}, queued=1, batched=False, observed_s=0.004)
    assert predict_seconds(fallback, T) == pytest.approx(0.008)
    slowed = CopyLoad("n", {1: 0.010}, queued=0, batched=False, slowdown=3.0)
    assert predict_seconds(slowed, T) == pytest.approx(0.030 + T), "calibrated by the slowdown"


def test_calibration_learns_the_slowdown_and_forgets_it_when_idle() -> None:
    now = [0.0]
    cal = Calibration(alpha=0.5, decay_s=2.0, clock=lambda: now[0])
    assert cal.factor("c") == 1.0
    for _ in range(10):
        cal.observe("c", predicted_s=0.010, actual_s=0.040)
    assert cal.factor("c") == pytest.approx(4.0, rel=0.01)
    now[0] += 20.0
    assert cal.factor("c") == pytest.approx(1.0, abs=0.01)
    cal.observe("c", predicted_s=0.0, actual_s=1.0)  # no prediction: ignored
    assert cal.factor("c") == pytest.approx(1.0, abs=0.01)
    assert predict_seconds(CopyLoad("n", {}, 0, False), T) == math.inf


def test_picks_the_most_accurate_variant_that_fits() -> None:
    s = Switcher(safety=1.0, transport_s=T)
    options = [option("accurate", 0.98, 0.008), option("fast", 0.90, 0.001)]
    choice = s.choose("digits", options, slo_s=0.020)
    assert choice.spec.variant == "accurate" and choice.fits
    loaded = [option("accurate", 0.98, 0.008, queued=4), option("fast", 0.90, 0.001)]
    choice = s.choose("digits", loaded, slo_s=0.020)
    assert choice.spec.variant == "fast" and choice.fits and "switched" in choice.reason


def test_falls_back_to_the_fastest_when_nothing_fits() -> None:
    s = Switcher(safety=1.0, transport_s=T)
    options = [
        option("accurate", 0.98, 0.008, queued=9),
        option("medium", 0.95, 0.004, queued=9),
        option("fast", 0.90, 0.001, queued=30),
    ]
    choice = s.choose("digits", options, slo_s=0.005)
    assert choice.spec.variant == "fast" and choice.fits is False


def test_respects_min_accuracy_and_refuses_an_impossible_one() -> None:
    s = Switcher(safety=1.0, transport_s=T)
    options = [option("accurate", 0.98, 0.008, queued=4), option("fast", 0.90, 0.001)]
    choice = s.choose("digits", options, slo_s=0.020, min_accuracy=0.95)
    assert choice.spec.variant == "accurate" and choice.fits is False
    with pytest.raises(FailedPrecondition, match=r"min_accuracy 0\.99.*0\.98"):
        s.choose("digits", options, slo_s=0.020, min_accuracy=0.99)


def test_no_slo_means_the_most_accurate_ready_variant() -> None:
    s = Switcher(safety=1.0, transport_s=T)
    options = [option("fast", 0.90, 0.001), option("accurate", 0.98, 0.008, queued=50)]
    assert s.choose("digits", options, slo_s=None).spec.variant == "accurate"


def test_hysteresis_prevents_flapping_at_the_edge() -> None:
    s = Switcher(safety=1.0, headroom=0.8, transport_s=T)
    slo = 0.020
    # Load pushes "accurate" just over the budget: step down.
    over = [option("accurate", 0.98, 0.0070, queued=2), option("fast", 0.9, 0.001)]
    assert s.choose("digits", over, slo).spec.variant == "fast"
    # Load eases to just under the budget (but above 0.8 x budget): stay down.
    edge = [option("accurate", 0.98, 0.0060, queued=2), option("fast", 0.9, 0.001)]
    assert s.choose("digits", edge, slo).spec.variant == "fast"
    # Clearly under: step back up.
    calm = [option("accurate", 0.98, 0.0070, queued=0), option("fast", 0.9, 0.001)]
    assert s.choose("digits", calm, slo).spec.variant == "accurate"
    # Without hysteresis the edge case would have flipped back at once.
    assert Switcher(safety=1.0, headroom=1.0, transport_s=T).choose(
        "digits", edge, slo
    ).spec.variant == ("accurate")


def test_the_safety_margin_keeps_predictions_clear_of_the_budget() -> None:
    options = [option("accurate", 0.98, 0.015), option("fast", 0.9, 0.001)]
    assert Switcher(safety=1.0, transport_s=T).choose("m", options, 0.020).spec.variant == (
        "accurate"
    )
    assert Switcher(safety=0.6, transport_s=T).choose("m", options, 0.020).spec.variant == "fast"


def test_the_switcher_keeps_a_level_only_for_choices_under_a_budget() -> None:
    s = Switcher(safety=1.0, transport_s=T)
    options = [option("accurate", 0.98, 0.008), option("fast", 0.90, 0.001)]
    s.choose("digits", options, slo_s=None)
    assert s.level("digits") is None, "no budget: nothing to step back up from"
    s.choose("digits", options, slo_s=0.005, commit=False)
    assert s.level("digits") is None, "explaining moves nothing"
    assert s.choose("digits", options, slo_s=0.005).spec.variant == "fast"
    assert s.level("digits") == 0.90
    again = choose_variant("digits", options, 0.0096, level=s.level("digits"), safety=1.0)
    assert again.spec.variant == "fast", "the pure choice honours the level it is given"
    assert choose_variant("digits", options, 0.0096, safety=1.0).spec.variant == "accurate"


def test_the_hysteresis_level_is_kept_per_version() -> None:
    """A rollout starts the new version's switching fresh: v1 stepping down does not hold v2's
    more accurate variant back."""
    idle = [option("accurate", 0.95, 0.008), option("fast", 0.80, 0.001)]
    busy = [option("accurate", 0.95, 0.008, queued=6), option("fast", 0.80, 0.001)]
    switcher = Switcher()
    assert switcher.choose("m", busy, 0.022, version="v1").spec.variant == "fast"
    assert switcher.level("m", "v1") == 0.80 and switcher.level("m", "v2") is None
    assert switcher.choose("m", idle, 0.022, version="v2").spec.variant == "accurate"
    assert switcher.choose("m", idle, 0.022, version="v1").spec.variant == "fast", "hysteresis"
    assert switcher.levels("m") == {"v1": 0.80, "v2": 0.95}
