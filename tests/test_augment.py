"""SpecAugment, MixUp, TimeShift, FreqShift, SpeedPerturb, TTA shifts and the soft-target loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audioclf.augment import (FreqShift, MixParams, MixUp, SpecAugment, SpeedPerturb, TimeShift, freq_shift,
                              soft_target_cross_entropy, speed_perturb, time_shift, tta_shifts)
from audioclf.config import AugmentConfig


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


# ---------------------------------------------------------------- SpecAugment

def test_freq_masks_are_bands_within_the_width_and_count():
    aug = SpecAugment(freq_masks=3, freq_mask_width=5, time_masks=0, generator=_gen())
    masked = aug(torch.ones(200, 1, 1000, 4)) == 0  # (B, 1, F, T); a masked row is masked at every t
    rows = masked[:, 0, :, 0]  # (B, F)
    assert torch.equal(masked, rows[:, None, :, None].expand_as(masked))
    runs = [_runs(r) for r in rows]
    assert all(len(r) <= 3 and all(w <= 5 for w in r) for r in runs)
    # widths are uniform in [0, 5] and 3 bands rarely touch in 1000 bins: most rows have 3
    assert sum(len(r) == 3 for r in runs) > 0.4 * len(runs)
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 150  # differ per example


def test_time_mask_width_as_a_fraction_of_the_length():
    aug = SpecAugment(freq_masks=0, time_masks=1, time_mask_width=0.1, generator=_gen())
    cols = (aug(torch.ones(300, 1, 8, 50)) == 0)[:, 0, 0, :]  # (B, T)
    widths = [sum(_runs(c)) for c in cols]
    assert max(widths) == 5  # int(0.1 * 50), reached within 300 draws
    assert min(widths) == 0


def test_time_mask_width_in_frames_is_capped_at_the_length():
    aug = SpecAugment(freq_masks=0, time_masks=1, time_mask_width=100, generator=_gen())
    cols = (aug(torch.ones(50, 1, 4, 10)) == 0)[:, 0, 0, :]
    assert cols.sum(1).max() <= 10
    assert bool(cols.all(1).any())  # a full-length mask is possible


def test_probability_p_masks_that_share_of_examples():
    x = torch.ones(400, 1, 32, 32)
    assert torch.equal(SpecAugment(p=0.0, generator=_gen())(x), x)
    masked = (SpecAugment(freq_mask_width=8, time_mask_width=8, p=0.5, generator=_gen())(x) == 0)
    share = masked.flatten(1).any(1).float().mean().item()
    assert 0.4 < share < 0.6


def test_mean_mask_value_is_each_examples_mean():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    aug = SpecAugment(freq_masks=1, freq_mask_width=6, time_masks=0, mask_value="mean")
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 2] = True  # row 2 of both examples
    out = aug.apply(x, mask)
    assert torch.equal(out[0, 0, 2], torch.full((6,), 17.5))  # mean of 0..35
    assert torch.equal(out[1, 0, 2], torch.full((6,), 53.5))  # mean of 36..71
    assert torch.equal(out[~mask], x[~mask])


def test_specaugment_is_identity_in_eval_mode():
    x = torch.randn(4, 1, 16, 20)
    aug = SpecAugment(freq_mask_width=8, time_mask_width=8).eval()
    assert aug(x) is x


def test_specaugment_seed_reproduces_and_draw_replays():
    x = torch.randn(8, 1, 64, 100)
    a = SpecAugment(generator=_gen(3))(x)
    b = SpecAugment(generator=_gen(3))(x)
    assert torch.equal(a, b)
    aug = SpecAugment(generator=_gen(3))
    mask = aug.draw(8, 64, 100)
    assert torch.equal(aug.apply(x, mask), a)
    assert not torch.equal(SpecAugment(generator=_gen(4))(x), a)


def test_masks_reach_the_first_and_last_bin_at_full_width():
    # start is uniform in [0, size - width]: an off-by-one would never touch one edge
    freq = SpecAugment(freq_masks=1, freq_mask_width=3, time_masks=0, generator=_gen()).draw(2000, 10, 12)
    time = SpecAugment(freq_masks=0, time_masks=1, time_mask_width=3, generator=_gen()).draw(2000, 10, 12)
    for rows in (freq[:, 0, :, 0], time[:, 0, 0, :]):  # (B, F) and (B, T)
        full = rows.sum(1) == 3
        assert rows[full, :3].all(1).any() and rows[full, -3:].all(1).any()


def test_specaugment_from_config():
    cfg = AugmentConfig(freq_masks=1, freq_mask_width=7, time_masks=3, time_mask_width=0.2,
                        specaugment_p=0.5, mask_value="mean")
    aug = SpecAugment.from_config(cfg)
    assert (aug.freq_masks, aug.freq_mask_width, aug.time_masks, aug.time_mask_width, aug.p,
            aug.mask_value) == (1, 7, 3, 0.2, 0.5, "mean")


# ---------------------------------------------------------------- MixUp

def test_mixup_apply_and_targets_by_hand():
    mix = MixUp(num_classes=3)
    params = MixParams(lam=torch.tensor([0.5, 0.25]), index=torch.tensor([1, 0]))
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(mix.apply(x, params), torch.tensor([[2.0, 2.0], [1.5, 1.0]]))
    y = mix.mix_targets(torch.tensor([0, 2]), params)
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.0, 0.5], [0.75, 0.0, 0.25]]))


@pytest.mark.parametrize("per_example", [False, True])
def test_mixup_targets_sum_to_one_and_lambda_in_unit_interval(per_example):
    mix = MixUp(alpha=0.4, num_classes=5, per_example=per_example, generator=_gen())
    params = mix.draw(64)
    assert params.lam.shape == (64,) and ((params.lam >= 0) & (params.lam <= 1)).all()
    assert sorted(params.index.tolist()) == list(range(64))  # a permutation
    assert (len(set(params.lam.tolist())) > 1) == per_example  # one lam per batch otherwise
    x, y = mix(torch.randn(64, 1, 8, 8), torch.randint(0, 5, (64,)))
    torch.testing.assert_close(y.sum(1), torch.ones(64))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64, 5)


@pytest.mark.parametrize("per_example", [False, True])
def test_mixup_call_mixes_inputs_and_targets_with_the_same_draw(per_example):
    # Input i is the one-hot e_i and its label is i: mixed with lam and partner j it becomes
    # lam e_i + (1 - lam) e_j, which shows the draw; the targets must be mixed by that draw.
    n = 32
    mix = MixUp(alpha=0.4, num_classes=n, per_example=per_example, p=0.75 if per_example else 1.0,
                generator=_gen(2))
    x, y = mix(torch.eye(n), torch.arange(n))
    lam = x.diagonal()  # lam_i, or 1 where example i was not mixed or drew itself
    assert ((lam > 0) & (lam < 1)).any()  # something was mixed
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha,share_between,tolerance", [
    (0.1, 0.187, 0.03),  # U-shaped: most lambdas near 0 or 1
    (1.0, 0.8, 0.03),  # uniform
    (50.0, 1.0, 0.0),  # concentrated at 0.5 (std 0.05)
])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha, share_between, tolerance):
    lam = MixUp(alpha=alpha, per_example=True, generator=_gen(0)).draw(4000).lam
    # share in (0.1, 0.9): Beta(alpha, alpha).cdf(0.9) - .cdf(0.1), from scipy.stats
    share = ((lam > 0.1) & (lam < 0.9)).float().mean().item()
    assert abs(share - share_between) <= tolerance
    assert abs(lam.mean().item() - 0.5) < 0.03  # symmetric
    if alpha == 50.0:
        assert ((lam - 0.5).abs() < 0.1).float().mean() > 0.9


def test_mixup_soft_and_multi_hot_targets():
    mix = MixUp(alpha=1.0, generator=_gen())
    params = mix.draw(4)
    soft = torch.softmax(torch.randn(4, 6), 1)
    torch.testing.assert_close(mix.mix_targets(soft, params).sum(1), torch.ones(4))
    multi = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    lam = params.lam[:, None]
    expected = lam * multi + (1 - lam) * multi[params.index]
    torch.testing.assert_close(mix.mix_targets(multi, params), expected)


def test_mixup_alpha_zero_and_p_zero_leave_the_batch_alone():
    x, y = torch.randn(8, 3), torch.arange(8) % 4
    for mix in (MixUp(alpha=0.0, num_classes=4, generator=_gen()), MixUp(p=0.0, num_classes=4)):
        xm, ym = mix(x, y)
        torch.testing.assert_close(xm, x)
        torch.testing.assert_close(ym, F.one_hot(y, 4).float())


def test_mixup_seed_reproduces():
    a = MixUp(per_example=True, generator=_gen(7)).draw(16)
    b = MixUp(per_example=True, generator=_gen(7)).draw(16)
    assert torch.equal(a.lam, b.lam) and torch.equal(a.index, b.index)


def test_mixup_integer_labels_need_num_classes():
    mix = MixUp()
    with pytest.raises(ValueError, match="num_classes"):
        mix.mix_targets(torch.tensor([0, 1]), mix.draw(2))
    assert mix.mix_targets(torch.tensor([0, 1]), mix.draw(2), num_classes=3).shape == (2, 3)


@pytest.mark.parametrize("labels,bad", [([0, 3, 1, 5], r"\[3, 5\]"), ([0, -1, 2, 1], r"\[-1\]")])
def test_mixup_labels_outside_the_classes_are_named(labels, bad):
    mix = MixUp(num_classes=3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\); got " + bad):
        mix(torch.zeros(4, 2), torch.tensor(labels))


def test_numpy_numbers_are_accepted_and_exported_names():
    import audioclf

    aug = SpecAugment(freq_masks=np.int64(1), freq_mask_width=np.int32(4), time_mask_width=np.float32(0.2),
                      p=np.float64(0.5))
    assert aug.max_time_width(50) == 10 and type(aug.freq_mask_width) is int
    assert TimeShift(np.int64(3)).max_samples(100) == 3 and TimeShift(np.float32(0.25)).max_samples(100) == 25
    assert MixUp(alpha=np.float32(0.4), num_classes=np.int64(3)).num_classes == 3
    assert audioclf.MixParams is MixParams and "MixParams" in audioclf.__all__


def test_soft_target_cross_entropy_equals_cross_entropy():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    soft = torch.softmax(torch.randn(6, 4), 1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(labels, 4).float()),
                               F.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft, reduction="none"),
                               F.cross_entropy(logits, soft, reduction="none"))
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft, reduction="sum"),
                               F.cross_entropy(logits, soft, reduction="sum"))


# ---------------------------------------------------------------- TimeShift

def test_time_shift_by_hand_on_four_samples():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(time_shift(x, 1), torch.tensor([[4.0, 1.0, 2.0, 3.0]]))
    torch.testing.assert_close(time_shift(x, 1, "pad"), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    torch.testing.assert_close(time_shift(x, -2, "pad"), torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
    two = torch.cat([x, x])
    torch.testing.assert_close(time_shift(two, torch.tensor([1, -1])),
                               torch.tensor([[4.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 1.0]]))


def test_circular_shift_by_k_then_minus_k_is_the_identity():
    x = torch.randn(5, 1, 8, 50)
    k = torch.tensor([0, 3, -7, 49, -50])
    torch.testing.assert_close(time_shift(time_shift(x, k), -k), x)
    for i in range(5):  # each example shifted by its own amount, over all leading dims
        torch.testing.assert_close(time_shift(x, k)[i], torch.roll(x[i], int(k[i]), -1))


@pytest.mark.parametrize("max_shift,bound", [(3, 3), (0.25, 25)])
def test_random_shifts_stay_within_max_shift(max_shift, bound):
    shifter = TimeShift(max_shift, generator=_gen())
    shifts = shifter.draw(500, 100)
    assert shifts.abs().max() == bound and shifts.min() == -bound  # the range is reached
    x = torch.arange(100.0).repeat(4, 1)
    out = shifter(x)
    for row in out:  # each row is a roll of 0..99
        k = (100 - int(row.argmin())) % 100
        assert min(k, 100 - k) <= bound


def test_time_shift_module_seed_and_eval():
    x = torch.randn(6, 400)
    assert torch.equal(TimeShift(0.5, generator=_gen(1))(x), TimeShift(0.5, generator=_gen(1))(x))
    shifter = TimeShift(0.5).eval()
    assert shifter(x) is x
    padded = TimeShift(10, mode="pad", generator=_gen())(torch.ones(50, 100))
    assert ((padded == 0).sum(1) <= 10).all() and bool((padded == 0).any())


def test_time_shift_from_config_and_rank_check():
    shifter = TimeShift.from_config(AugmentConfig(time_shift=0.2))
    assert (shifter.max_shift, shifter.mode, shifter.max_samples(1000)) == (0.2, "circular", 200)
    with pytest.raises(ValueError, match=r"\(B, \.\.\., L\).*\(4,\)"):
        time_shift(torch.zeros(4), 1)


def test_tta_shifts_are_deterministic_and_bounded():
    assert tta_shifts(1, 1000, 0.3) == [0]
    assert tta_shifts(5, 1000, 0.2) == [0, 100, -100, 200, -200]
    for n in range(1, 9):
        shifts = tta_shifts(n, 333, 0.3)
        assert len(shifts) == n and shifts[0] == 0 and shifts == tta_shifts(n, 333, 0.3)
        assert max(abs(s) for s in shifts) <= int(0.3 * 333)


# ---------------------------------------------------------------- argument checks

BAD_ARGS = {
    "spec-p": (lambda: SpecAugment(p=1.5), r"p must be in \[0, 1\] \(1.5 given\)"),
    "spec-freq_masks": (lambda: SpecAugment(freq_masks=-1), r"freq_masks must be .* \(-1 given\)"),
    "spec-freq_mask_width": (lambda: SpecAugment(freq_mask_width=2.5), r"freq_mask_width .* \(2.5 given\)"),
    "spec-time_masks": (lambda: SpecAugment(time_masks=-2), r"time_masks must be .* \(-2 given\)"),
    "spec-time_mask_width": (lambda: SpecAugment(time_mask_width=1.5), r"time_mask_width .* \(1.5 given\)"),
    "spec-mask_value": (lambda: SpecAugment(mask_value="max"), r"mask_value .* \('max' given\)"),
    "mixup-alpha": (lambda: MixUp(alpha=-0.1), r"alpha must be a number >= 0 .*\(-0.1 given\)"),
    "mixup-p": (lambda: MixUp(p=-0.5), r"p must be in \[0, 1\] \(-0.5 given\)"),
    "mixup-num_classes": (lambda: MixUp(num_classes=0), r"num_classes .* \(0 given\)"),
    # wrong types: ValueError quoting the value, not a TypeError from a comparison
    "mixup-alpha-string": (lambda: MixUp(alpha="0.4"), r"alpha must be a number >= 0 .*\('0.4' given\)"),
    "mixup-p-string": (lambda: MixUp(p="1"), r"p must be in \[0, 1\] \('1' given\)"),
    "spec-p-string": (lambda: SpecAugment(p="x"), r"p must be in \[0, 1\] \('x' given\)"),
    "spec-time_mask_width-string": (lambda: SpecAugment(time_mask_width="0.1"),
                                    r"time_mask_width .* \('0.1' given\)"),
    "shift-string": (lambda: TimeShift("0.1"), r"max_shift .* \('0.1' given\)"),
    "freqshift-p-string": (lambda: FreqShift(2, p="0.5"), r"p must be in \[0, 1\] \('0.5' given\)"),
    "tta-fraction-string": (lambda: tta_shifts(3, 100, "0.2"), r"max_fraction .* \('0.2' given\)"),
    "shift-fraction": (lambda: TimeShift(1.5), r"max_shift .* \(1.5 given\)"),
    "shift-negative": (lambda: TimeShift(-3), r"max_shift .* \(-3 given\)"),
    "shift-mode": (lambda: TimeShift(3, mode="reflect"), r"mode .* \('reflect' given\)"),
    "tta-views": (lambda: tta_shifts(0, 100, 0.1), r"n_views .* \(0 given\)"),
    "tta-fraction": (lambda: tta_shifts(3, 100, 2.0), r"max_fraction .* \(2.0 given\)"),
    "loss-reduction": (lambda: soft_target_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2), "avg"),
                       r"reduction .* \('avg' given\)"),
}


@pytest.mark.parametrize("make,message", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.cuda
def test_augmentations_on_cuda_match_cpu_draws():
    x = torch.randn(8, 1, 32, 40)
    cpu = SpecAugment(generator=_gen(5))(x)
    gpu = SpecAugment(generator=_gen(5))(x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    params = MixUp(generator=_gen(5)).draw(8, "cuda")
    assert params.lam.device.type == "cuda"
    torch.testing.assert_close(time_shift(x.cuda(), torch.arange(8)).cpu(), time_shift(x, torch.arange(8)))


# --- FreqShift ------------------------------------------------------------------------


def test_freq_shift_moves_bins_and_repeats_the_edge():
    x = torch.arange(5.0).view(1, 1, 5, 1).repeat(2, 1, 1, 3)  # bin f holds the value f
    out = freq_shift(x, torch.tensor([2, -1]))
    assert out[0, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]  # content moved up, bin 0 repeated
    assert out[1, 0, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]  # moved down, top bin repeated
    assert torch.equal(freq_shift(x, torch.zeros(2, dtype=torch.long)), x)


def test_freq_shift_draws_within_bounds_per_example_and_replays():
    fs = FreqShift(3, generator=torch.Generator().manual_seed(0))
    shifts = fs.draw(2000)
    assert shifts.min() == -3 and shifts.max() == 3
    again = FreqShift(3, generator=torch.Generator().manual_seed(0)).draw(2000)
    assert torch.equal(shifts, again)
    assert (FreqShift(3, p=0.0).draw(100) == 0).all()


def test_freq_shift_is_identity_in_eval_mode():
    x = torch.randn(4, 1, 16, 10)
    fs = FreqShift(4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(fs.train()(x), x)
    assert torch.equal(fs.eval()(x), x)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_shift": -1}, "max_shift must be a number of bins (int >= 0) (-1 given)"),
    ({"max_shift": 1.5}, "max_shift must be a number of bins"),
    ({"max_shift": 2, "p": 1.5}, "p must be in [0, 1] (1.5 given)"),
])
def test_freq_shift_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as e:
        FreqShift(**kwargs)
    assert message in str(e.value)


# --- SpeedPerturb -----------------------------------------------------------------------


def test_speed_perturb_reads_about_the_centre_by_hand():
    x = torch.arange(9.0).repeat(3, 1)  # (3, 9): sample n holds n; the centre is sample 4
    out = speed_perturb(x, torch.tensor([1.0, 2.0, 0.5]))
    assert torch.equal(out[0], x[0])  # factor 1: unchanged
    # factor 2 reads positions 4 + 2 (n - 4) = -4, -2, 0, ..., 8, 10, 12: zeros outside
    assert out[1].tolist() == [0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0, 0.0, 0.0]
    # factor 0.5 reads 4 + (n - 4) / 2 = 2, 2.5, ..., 6: linear interpolation in between
    assert out[2].tolist() == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]


def test_speed_perturb_scales_a_tone_frequency_by_the_factor():
    rate, n = 8000, 8000
    t = torch.arange(n, dtype=torch.float64) / rate
    tone = torch.sin(2 * np.pi * 500 * t).float().repeat(2, 1)  # (2, N) 500 Hz
    out = speed_perturb(tone, torch.tensor([1.1, 0.9]))
    mid = slice(n // 4, 3 * n // 4)  # a stretch that stays inside the clip for both factors
    peaks = torch.fft.rfft(out[:, mid] * torch.hann_window(n // 2), dim=1).abs().argmax(1)
    hz = peaks.double() * rate / (n // 2)
    assert hz.tolist() == pytest.approx([550.0, 450.0], abs=2 * rate / (n // 2))


def test_speed_perturb_batched_equals_one_by_one():
    x, factor = torch.randn(5, 300), torch.tensor([0.9, 1.0, 1.05, 1.1, 0.95])
    one_by_one = torch.cat([speed_perturb(x[i:i + 1], factor[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(speed_perturb(x, factor), one_by_one)


def test_speed_perturb_draws_within_bounds_replays_and_is_identity_in_eval_mode():
    sp = SpeedPerturb(0.1, generator=_gen(0))
    factors = sp.draw(2000)
    assert 0.9 <= factors.min() < 0.91 and 1.09 < factors.max() <= 1.1
    assert torch.equal(factors, SpeedPerturb(0.1, generator=_gen(0)).draw(2000))
    assert (SpeedPerturb(0.1, p=0.0).draw(50) == 1).all()
    x = torch.randn(4, 800)
    assert not torch.equal(SpeedPerturb(0.1, generator=_gen(1)).train()(x), x)
    assert torch.equal(SpeedPerturb(0.1, generator=_gen(1)).eval()(x), x)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_change": -0.1}, "max_change must be in [0, 0.5) (-0.1 given)"),
    ({"max_change": 0.5}, "max_change must be in [0, 0.5) (0.5 given)"),
    ({"max_change": "0.1"}, "max_change must be in [0, 0.5) ('0.1' given)"),
    ({"max_change": 0.1, "p": 2}, "p must be in [0, 1] (2 given)"),
])
def test_speed_perturb_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as e:
        SpeedPerturb(**kwargs)
    assert message in str(e.value)


def test_speed_perturb_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expects \(B, N\) waveforms"):
        speed_perturb(torch.zeros(2, 1, 10), torch.ones(2))
    with pytest.raises(ValueError, match=r"factor must have shape \(B,\)=\(2,\)"):
        speed_perturb(torch.zeros(2, 10), torch.ones(3))
