from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cluster.planner.latency import (
    LatencyProfile,
    ProfileSet,
    fit_profile,
    fit_relative,
    from_distserve,
    load_profiles,
    save_profiles,
    solve3,
)

PREFILL = (12.0, 0.08, 5e-6)
SMALL = (15.0, 5e-4, 0.03)
LARGE = (6.0, 5e-4, 0.15)
THRESHOLD = 64

# Two layouts from DistServe's published profiler-a100-80g.distserve.json (OPT-13B),
# in its own key names and shape: model -> tp -> coefficient sets.
DISTSERVE = {
    "facebook/opt-13b": {
        "1": {
            "decoding_large_small_bs_threshold": 95,
            "prefill": [16.456860431694288, 0.09264750660897617, 6.474785740229194e-06],
            "decoding_smallbs": [19.934702624895458, 0.0006269356524350583, 0.03850697740828398],
            "decoding_largebs": [7.1661889468253595, 0.0005798000403396046, 0.15831096191764046],
        },
        "2": {
            "decoding_large_small_bs_threshold": 95,
            "prefill": [13.402703359246601, 0.06234291581603636, 2.226884309113053e-06],
            "decoding_smallbs": [13.294796350285385, 0.00034109219700723494, 0.06296393225243659],
            "decoding_largebs": [10.638741913126715, 0.00031183369638295723, 0.08562913604102729],
        },
    }
}


def _true_prefill(lengths: list[int]) -> float:
    a, b, c = PREFILL
    return a + b * sum(lengths) + c * sum(x * x for x in lengths)


def _true_decode(contexts: list[int]) -> float:
    a, b, c = SMALL if len(contexts) < THRESHOLD else LARGE
    return a + b * sum(contexts) + c * len(contexts)


def _samples(seed: int) -> tuple[list[tuple[list[int], float]], list[tuple[list[int], float]]]:
    rng = random.Random(seed)
    prefill = []
    for n in (1, 1, 2, 3, 4, 6, 8, 12, 16):
        lengths = [rng.randint(16, 2048) for _ in range(n)]
        prefill.append((lengths, _true_prefill(lengths)))
    decode = []
    for batch in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256):
        for _ in range(2):
            contexts = [rng.randint(64, 4096) for _ in range(batch)]
            decode.append((contexts, _true_decode(contexts)))
    return prefill, decode


def test_formulas() -> None:
    prof = LatencyProfile(1, 1, PREFILL, SMALL, LARGE, THRESHOLD)
    assert prof.prefill_ms(3000, 5_000_000) == pytest.approx(12.0 + 240.0 + 25.0)
    assert prof.decode_ms(63, 10_000) == pytest.approx(15.0 + 5.0 + 1.89)
    assert prof.decode_ms(64, 10_000) == pytest.approx(6.0 + 5.0 + 9.6)
    # chunked prefill + decodes in one step: the larger fixed cost once
    assert prof.mixed_ms(100, 10_000, 10, 1000) == pytest.approx(
        prof.prefill_ms(100, 10_000) + prof.decode_ms(10, 1000) - 12.0
    )


def test_time_never_goes_negative() -> None:
    prof = LatencyProfile(1, 1, (-5.0, 0.0, 0.0), (-5.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    assert prof.prefill_ms(10, 100) > 0
    assert prof.decode_ms(1, 10) > 0


def test_solve3() -> None:
    x = solve3([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [2.0, 0.0, 3.0]], [5.0, 5.0, 11.0])
    assert x == pytest.approx([1.0, 1.0, 3.0])


def test_fit_recovers_known_coefficients_and_threshold() -> None:
    prefill, decode = _samples(seed=1)
    prof = fit_profile(prefill, decode, tp=2, pp=1)
    assert prof.layout == (2, 1)
    assert prof.decode_threshold == THRESHOLD
    assert prof.prefill == pytest.approx(PREFILL, rel=1e-6)
    assert prof.decode_small == pytest.approx(SMALL, rel=1e-6)
    assert prof.decode_large == pytest.approx(LARGE, rel=1e-6)


def test_fit_with_one_percent_noise_predicts_within_two_percent() -> None:
    prefill, decode = _samples(seed=2)
    rng = random.Random(3)
    noisy_p = [(ls, ms * (1 + rng.gauss(0, 0.01))) for ls, ms in prefill]
    noisy_d = [(cs, ms * (1 + rng.gauss(0, 0.01))) for cs, ms in decode]
    prof = fit_profile(noisy_p, noisy_d, decode_threshold=THRESHOLD)
    for lengths, _ in prefill:
        got = prof.prefill_ms(sum(lengths), sum(x * x for x in lengths))
        assert got == pytest.approx(_true_prefill(lengths), rel=0.02)
    for contexts, _ in decode:
        got = prof.decode_ms(len(contexts), sum(contexts))
        assert got == pytest.approx(_true_decode(contexts), rel=0.02)


def test_fit_weights_relative_error() -> None:
    # Two regimes that one line cannot fit: relative weighting keeps the small one exact
    # enough that neither is off by more than it must be.
    rows = [(1.0, float(x), 0.0) for x in (1, 2, 3, 1000, 2000, 3000)]
    ys = [1.0 + x for x in (1, 2, 3)] + [10.0 + x for x in (1000, 2000, 3000)]
    rows = [(r[0], r[1], r[1] ** 0.5) for r in rows]  # a third, non-collinear column
    a, b, c = fit_relative(rows, ys, "samples")
    for r, y in zip(rows, ys, strict=True):
        assert abs(a + b * r[1] + c * r[2] - y) / y < 0.15


def test_fit_rejects_collinear_samples_naming_them() -> None:
    same_shape = [([100, 100], 10.0), ([100, 100], 11.0), ([100, 100], 12.0)]
    _, decode = _samples(seed=1)
    with pytest.raises(ValueError, match="^prefill_samples: the features are collinear"):
        fit_profile(same_shape, decode)
    with pytest.raises(ValueError, match="^prefill_samples: need >= 3 samples"):
        fit_profile(same_shape[:2], decode)
    with pytest.raises(ValueError, match="^prefill_samples: latencies must be > 0"):
        fit_profile([([1], 0.0), ([2], 1.0), ([3], 2.0)], decode)


def test_too_few_batch_shapes_fit_one_decode_set() -> None:
    prefill, _ = _samples(seed=1)
    decode = [([1000] * b, 10.0 + 0.5 * b + 0.001 * 1000 * b) for b in (1, 2, 3, 5)]
    decode[1] = ([1000, 2000], 10.0 + 1.0 + 0.001 * 3000)
    prof = fit_profile(prefill, decode)
    assert prof.decode_small == prof.decode_large
    assert prof.decode_threshold == 6
    assert prof.decode_small == pytest.approx((10.0, 0.001, 0.5), rel=1e-6)


def test_profile_set_json_round_trip(tmp_path: Path) -> None:
    profiles = ProfileSet(
        {
            (1, 1): LatencyProfile(1, 1, PREFILL, SMALL, LARGE, THRESHOLD),
            (2, 2): LatencyProfile(2, 2, LARGE, SMALL, PREFILL, 10),
        },
        model="toy",
        gpu="H100-80G",
    )
    path = tmp_path / "profiles.json"
    save_profiles(profiles, path)
    assert json.loads(path.read_text())["version"] == 1
    assert load_profiles(path) == profiles


def test_a_missing_pp_borrows_the_pp1_coefficients() -> None:
    profiles = ProfileSet({(2, 1): LatencyProfile(2, 1, PREFILL, SMALL, LARGE, THRESHOLD)})
    derived = profiles.get(2, 4)
    assert derived.layout == (2, 4)
    assert (derived.prefill, derived.decode_large) == (PREFILL, LARGE)
    assert profiles.has(2, 3) and not profiles.has(4, 1)
    with pytest.raises(ValueError, match=r"^layout: no profile for tp=4 pp=1 \(have tp=2 pp=1\)"):
        profiles.get(4, 1)


def test_distserve_profile_read_as_is(tmp_path: Path) -> None:
    profiles = from_distserve(DISTSERVE)
    assert profiles.model == "facebook/opt-13b"
    assert profiles.layouts() == [(1, 1), (2, 1)]
    tp1 = profiles.get(1, 1)
    assert tp1.prefill == tuple(DISTSERVE["facebook/opt-13b"]["1"]["prefill"])
    assert tp1.decode_small[0] == 19.934702624895458
    assert tp1.decode_large[2] == 0.15831096191764046
    assert tp1.decode_threshold == 95
    path = tmp_path / "profiler-a100-80g.distserve.json"
    path.write_text(json.dumps(DISTSERVE))
    assert load_profiles(path) == profiles


def test_distserve_alternative_key_names() -> None:
    entry = {"prefill": [1, 2, 3], "decoding_small": [4, 5, 6], "decoding_large": [7, 8, 9]}
    prof = from_distserve({"m": {"4": entry}}).get(4, 1)
    assert (prof.decode_small, prof.decode_large, prof.decode_threshold) == (
        (4.0, 5.0, 6.0),
        (7.0, 8.0, 9.0),
        95,
    )


def test_distserve_errors_name_the_field() -> None:
    two = {"a": DISTSERVE["facebook/opt-13b"], "b": DISTSERVE["facebook/opt-13b"]}
    with pytest.raises(ValueError, match="^model: the profile holds several models"):
        from_distserve(two)
    with pytest.raises(ValueError, match="^model: must be one of a, b"):
        from_distserve(two, "c")
    with pytest.raises(ValueError, match=r"^m\.1\.decoding_smallbs: missing"):
        from_distserve({"m": {"1": {"prefill": [1, 2, 3]}}})
    with pytest.raises(ValueError, match="^prefill: must be three numbers"):
        from_distserve(
            {
                "m": {
                    "1": {
                        "prefill": [1, 2],
                        "decoding_smallbs": [1, 2, 3],
                        "decoding_largebs": [1, 2, 3],
                    }
                }
            }
        )


def test_bad_profile_files(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="^profile: not valid JSON"):
        load_profiles(path)
    path.write_text(json.dumps({"schema": "baton.latency_profiles", "version": 9}))
    with pytest.raises(ValueError, match="^version: must be 1"):
        load_profiles(path)
    with pytest.raises(ValueError, match="^profile: no such file"):
        load_profiles(tmp_path / "missing.json")


# Prefill on a CPU: per-token cost a fifth higher from 1024 batch tokens up.
CPU_SMALL = (60.0, 1.5, 2e-4)
CPU_LARGE = (40.0, 1.8, 2e-4)


def _cpu_prefill(lengths: list[int]) -> float:
    a, b, c = CPU_LARGE if sum(lengths) >= 1024 else CPU_SMALL
    return a + b * sum(lengths) + c * sum(x * x for x in lengths)


def _cpu_samples() -> list[tuple[list[int], float]]:
    shapes = [(b, n) for n in (64, 128, 256, 512, 768, 1024) for b in (1, 2, 4) if b * n <= 2048]
    return [([n] * b, _cpu_prefill([n] * b)) for b, n in shapes]


def test_fit_splits_prefill_where_one_set_cannot_follow_the_cost() -> None:
    _, decode = _samples(seed=1)
    prof = fit_profile(_cpu_samples(), decode)
    assert prof.prefill_threshold == 1024
    assert prof.prefill == pytest.approx(CPU_SMALL, rel=1e-6)
    assert prof.prefill_large == pytest.approx(CPU_LARGE, rel=1e-6)
    assert prof.prefill_ms(1023, 1023**2) == pytest.approx(_cpu_prefill([1023]))
    assert prof.prefill_ms(2048, 2 * 1024**2) == pytest.approx(_cpu_prefill([1024, 1024]))
    # One set fits DistServe's form exactly: no split.
    prefill, _ = _samples(seed=1)
    assert fit_profile(prefill, decode).prefill_large is None


def test_a_split_prefill_survives_json_and_borrowing(tmp_path: Path) -> None:
    prof = LatencyProfile(1, 1, CPU_SMALL, SMALL, LARGE, THRESHOLD, CPU_LARGE, 1024)
    path = tmp_path / "profiles.json"
    save_profiles(ProfileSet({(1, 1): prof}), path)
    assert load_profiles(path).get(1, 1) == prof
    borrowed = ProfileSet({(1, 1): prof}).get(1, 2)
    assert (borrowed.pp, borrowed.prefill_large, borrowed.prefill_threshold) == (2, CPU_LARGE, 1024)
    # the mixed step's shared fixed part is the large set's, past the threshold
    assert prof.mixed_ms(2048, 2 * 1024**2, 4, 4000) == pytest.approx(
        prof.prefill_ms(2048, 2 * 1024**2) + prof.decode_ms(4, 4000) - 15.0
    )
    with pytest.raises(ValueError, match="^prefill_threshold: prefill_large and"):
        LatencyProfile(1, 1, CPU_SMALL, SMALL, LARGE, THRESHOLD, CPU_LARGE)
    with pytest.raises(ValueError, match="^prefill_threshold: must be"):
        LatencyProfile(1, 1, CPU_SMALL, SMALL, LARGE, THRESHOLD, CPU_LARGE, 0)


def test_a_scaled_profile_stretches_each_phase_by_its_factor() -> None:
    prof = LatencyProfile(1, 1, CPU_SMALL, SMALL, LARGE, THRESHOLD, CPU_LARGE, 1024)
    slow = prof.scaled(prefill=1.25, decode=0.8)
    for tokens in (100, 2048):  # both prefill sets
        assert slow.prefill_ms(tokens, tokens**2) == pytest.approx(
            1.25 * prof.prefill_ms(tokens, tokens**2)
        )
    for batch in (4, 100):  # both decode sets
        assert slow.decode_ms(batch, 50 * batch) == pytest.approx(
            0.8 * prof.decode_ms(batch, 50 * batch)
        )
    assert (slow.decode_threshold, slow.prefill_threshold) == (THRESHOLD, 1024)
    assert LatencyProfile(1, 1, PREFILL, SMALL, LARGE).scaled(2.0).prefill_large is None
    with pytest.raises(ValueError, match="^decode: must be > 0"):
        prof.scaled(decode=0.0)
