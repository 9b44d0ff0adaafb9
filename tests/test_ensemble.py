import numpy as np
import pytest
import torch

from audioclf import ensemble

# Two members, two classes: geometric sqrt(.5*.9) : sqrt(.5*.1) = 3 : 1 -> [0.75, 0.25].
P1 = np.array([[0.5, 0.5]])
P2 = np.array([[0.9, 0.1]])


def test_arithmetic_mean_by_hand():
    np.testing.assert_allclose(ensemble.arithmetic_mean([P1, P2]), [[0.7, 0.3]])


def test_geometric_mean_by_hand():
    np.testing.assert_allclose(ensemble.geometric_mean([P1, P2]), [[0.75, 0.25]])


def test_geometric_mean_is_renormalised_exp_mean_log():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(3, 5))  # (M=3, N=5, K=4)
    unnormalised = np.exp(np.log(probs).mean(axis=0))
    expected = unnormalised / unnormalised.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ensemble.geometric_mean(probs), expected, rtol=1e-12)
    # Before renormalisation the geometric mean never exceeds the arithmetic one (AM-GM).
    assert np.all(unnormalised <= ensemble.arithmetic_mean(probs) + 1e-15)


def test_geometric_mean_of_softmaxes_is_softmax_of_mean_logits():
    logits = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (M, N, K)
    probs = torch.softmax(logits, -1).numpy()
    expected = torch.softmax(logits.mean(0), -1).numpy()
    np.testing.assert_allclose(ensemble.geometric_mean(probs), expected, rtol=1e-9)


def test_geometric_mean_survives_exact_zeros_and_large_member_counts():
    probs = np.concatenate([np.tile(P2, (999, 1, 1)), np.array([[[1.0, 0.0]]])])  # (1000, 1, 2)
    out = ensemble.geometric_mean(probs)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    assert out[0, 0] > 0.9  # one member's exact zero for class 1 vetoes it, as floored


def test_combine_log_probs_matches_probability_rules():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=(2, 4, 7))  # (models=2, views=4, N=7, K=3)
    for rule in ensemble.RULES:
        expected = ensemble.combine(probs.reshape(8, 7, 3), rule)
        np.testing.assert_allclose(ensemble.combine_log_probs(np.log(probs), rule), expected, rtol=1e-10)


def test_one_extreme_log_prob_cannot_veto_in_log_space_either():
    # Two members say 0.9 for class 0; a third says log p = -200 (exp underflows to ~1e-87).
    lp = np.log(np.array([[[0.9, 0.1]], [[0.9, 0.1]], [[1.0, 1.0]]]))  # (M=3, N=1, K=2)
    lp[2, 0] = [-200.0, 0.0]
    floored = np.array([[0.9, 0.1], [0.9, 0.1], [ensemble.GEOMETRIC_FLOOR, 1.0]])  # what geometric_mean sees
    unnormalised = np.exp(np.log(floored).mean(axis=0))
    expected = unnormalised / unnormalised.sum()
    np.testing.assert_allclose(ensemble.combine_log_probs(lp, "geometric")[0], expected, rtol=1e-12)
    np.testing.assert_allclose(ensemble.combine_log_probs(lp, "geometric"), ensemble.geometric_mean(np.exp(lp)),
                               rtol=1e-12)


def test_single_member_is_returned_unchanged():
    probs = np.array([[[0.2, 0.3, 0.5]]])
    for rule in ensemble.RULES:
        np.testing.assert_allclose(ensemble.combine(probs, rule), probs[0])


@pytest.mark.parametrize("bad, match", [
    (np.ones((2, 3)), r"\(M, N, K\)"),
    (np.ones((0, 2, 3)), r"\(M, N, K\)"),
])
def test_bad_member_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        ensemble.arithmetic_mean(bad)


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="'median'"):
        ensemble.combine(np.ones((1, 1, 2)) / 2, "median")


class _Energy(torch.nn.Module):
    """A stand-in model: logits from the energy in each quarter of the waveform."""

    def forward(self, x):  # (B, N) -> (B, 4)
        return (x.reshape(x.shape[0], 4, -1) ** 2).sum(-1)


def test_tta_with_one_view_equals_no_tta():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    views = ensemble.tta_views(x, n_views=1, max_fraction=0.5)
    assert views.shape == (1, 3, 16)
    assert torch.equal(views[0], x)
    model = _Energy()
    expected = torch.softmax(model(x), -1).double().numpy()
    for rule in ensemble.RULES:
        np.testing.assert_allclose(ensemble.predict_members([model], x, [0], rule=rule), expected, rtol=1e-6)


def test_tta_views_are_deterministic_shifts():
    x = torch.arange(8.0).repeat(2, 1)  # (2, 8)
    views = ensemble.tta_views(x, n_views=3, max_fraction=0.25)  # shifts 0, +2, -2
    assert views.shape == (3, 2, 8)
    assert torch.equal(views[1, 0], torch.tensor([6.0, 7, 0, 1, 2, 3, 4, 5]))
    assert torch.equal(views[2, 0], torch.tensor([2.0, 3, 4, 5, 6, 7, 0, 1]))
    padded = ensemble.tta_views(x, n_views=3, max_fraction=0.25, mode="pad")
    assert torch.equal(padded[1, 0], torch.tensor([0.0, 0, 0, 1, 2, 3, 4, 5]))
    assert torch.equal(ensemble.tta_views(x, 3, 0.25), views)


def test_members_are_models_times_views():
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    models = [_Energy(), torch.nn.Sequential(_Energy(), torch.nn.Linear(4, 4))]
    lp = ensemble.member_log_probs(models, x, [0, 4, -4])
    assert lp.shape == (2, 3, 5, 4)
    # Batch consistency: item by item gives the same log-probs.
    single = torch.cat([ensemble.member_log_probs(models, x[i:i + 1], [0, 4, -4]) for i in range(5)], dim=2)
    torch.testing.assert_close(lp, single)
    # Member (1, 2) is model 1 on the waveform shifted by -4.
    torch.testing.assert_close(lp[1, 2], torch.log_softmax(models[1](torch.roll(x, -4, -1)), -1))


def test_score_dataset_stacks_batches_in_order():
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(4))
    dataset = [(x[i], 0) for i in range(7)]
    out = ensemble.score_dataset([_Energy()], dataset, shifts=[0, 2], batch_size=3)
    assert out.shape == (1, 2, 7, 4)
    np.testing.assert_allclose(out[0], ensemble.member_log_probs([_Energy()], x, [0, 2])[0].numpy(), rtol=1e-6)


def test_bundle_checks_the_rules_the_ensemble_runs():
    from audioclf import bundle  # repeats the names so that reading a bundle needs no torch

    assert bundle.RULES == ensemble.RULES
