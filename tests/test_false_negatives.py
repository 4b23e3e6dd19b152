"""Relevance-aware negatives (`false_negative_threshold` / `false_negative_ramp`) against brute-force references
written from the formulas in `modeling_bcls/losses/false_negatives.py`, with gradients, and through the config."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from modeling_bcls import BCLSConfig
from modeling_bcls.losses import bcls_loss, infonce_loss, negative_weights, triplet_sn_loss, vse_triplet_loss
from test_losses import make_batch, mean


def ref_weight(r, threshold, ramp):
    if ramp == 0:
        return 1.0 if r <= threshold else 0.0
    return 1.0 - min(max((r - threshold) / ramp, 0.0), 1.0)


def ref_terms(S, P, R, binary, threshold, ramp, margin=0.2, tau=0.1):
    """Per (q, p) terms of the weighted binary losses, plain loops over Python floats."""
    terms = []
    for q in range(S.shape[0]):
        negatives = [(n, ref_weight(float(R[q, n]), threshold, ramp)) for n in range(S.shape[1]) if not P[q, n]]
        negatives = [(n, w) for n, w in negatives if w > 0]
        if not negatives:
            continue
        for p in range(S.shape[1]):
            if not P[q, p]:
                continue
            s_p = float(S[q, p])
            if binary == "triplet_sn":
                total = sum(w * math.exp((margin + float(S[q, n]) - s_p) / tau) for n, w in negatives)
                terms.append(tau * math.log1p(total))
            elif binary == "vse":
                terms.append(max(w * max(0.0, margin + float(S[q, n]) - s_p) for n, w in negatives))
            else:
                pos = math.exp(s_p / tau)
                terms.append(-math.log(pos / (pos + sum(w * math.exp(float(S[q, n]) / tau) for n, w in negatives))))
    return terms


CASES = [(0.5, 0.0), (0.3, 0.4), (0.7, 0.2), (-2.0, 0.0)]  # the last leaves every negative out


@pytest.mark.parametrize("shape", [(5, 5), (6, 9), (8, 4)])
@pytest.mark.parametrize("threshold,ramp", CASES)
def test_weighted_binary_losses_match_reference(shape, threshold, ramp):
    sim, mask, relevance = make_batch(*shape, seed=3)
    weights = negative_weights(relevance, threshold, ramp)
    for binary, fn, kwargs in [
        ("triplet_sn", triplet_sn_loss, dict(margin=0.2, temperature=0.1)),
        ("vse", vse_triplet_loss, dict(margin=0.2)),
        ("infonce", infonce_loss, dict(temperature=0.1)),
    ]:
        ref = ref_terms(sim, mask, relevance, binary, threshold, ramp)
        got = fn(sim, mask, reduction="none", negative_weights=weights, **kwargs)
        torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_weights_formula_and_limits():
    relevance = torch.tensor([[0.1, 0.5, 0.55, 0.6, 0.9]])
    assert negative_weights(relevance, 0.5).tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]  # hard: R <= θ kept
    torch.testing.assert_close(negative_weights(relevance, 0.5, 0.2), torch.tensor([[1.0, 1.0, 0.75, 0.5, 0.0]]))
    # weights of 1 everywhere give exactly the unweighted loss; a ramp that starts above every label too
    sim, mask, relevance = make_batch(6, 9, seed=5)
    plain = bcls_loss(sim, mask, relevance)
    for threshold, ramp in [(1.0, 0.0), (1.0, 0.3)]:
        out = bcls_loss(sim, mask, relevance, false_negative_threshold=threshold, false_negative_ramp=ramp)
        torch.testing.assert_close(out["loss"], plain["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("binary", ["triplet_sn", "vse", "infonce"])
@pytest.mark.parametrize("kendall_weight", [0.0, 0.5])
def test_bcls_loss_uses_the_weights_in_both_directions(binary, kendall_weight):
    sim, mask, relevance = make_batch(7, 7, seed=11)
    threshold, ramp = 0.4, 0.3
    out = bcls_loss(sim, mask, relevance, binary_loss=binary, kendall_weight=kendall_weight, margin=0.2,
                    soft_negative_temperature=0.1, infonce_temperature=0.1,
                    false_negative_threshold=threshold, false_negative_ramp=ramp)
    i2t = mean(ref_terms(sim, mask, relevance, binary, threshold, ramp))
    t2i = mean(ref_terms(sim.T, mask.T, relevance.T, binary, threshold, ramp))
    torch.testing.assert_close(out["triplet"].item(), (i2t + t2i) / 2, rtol=1e-5, atol=1e-6)
    plain = bcls_loss(sim, mask, relevance, binary_loss=binary, kendall_weight=kendall_weight,
                      infonce_temperature=0.1)
    torch.testing.assert_close(out["kendall"], plain["kendall"])  # the Kendall term is not weighted
    assert not torch.allclose(out["triplet"], plain["triplet"])


def test_gradients_of_weighted_losses():
    sim, mask, relevance = make_batch(5, 7, seed=13, dtype=torch.float64)
    sim.requires_grad_()
    weights = negative_weights(relevance, 0.4, 0.3)
    assert ((weights > 0) & (weights < 1)).any() and (weights == 0).any()
    assert torch.autograd.gradcheck(lambda s: triplet_sn_loss(s, mask, 0.2, 0.1, negative_weights=weights), (sim,))
    assert torch.autograd.gradcheck(lambda s: infonce_loss(s, mask, 0.1, negative_weights=weights), (sim,))
    assert torch.autograd.gradcheck(lambda s: vse_triplet_loss(s, mask, 0.2, negative_weights=weights), (sim,))
    assert torch.autograd.gradcheck(
        lambda s: bcls_loss(s, mask, relevance, false_negative_threshold=0.4, false_negative_ramp=0.3,
                            kendall_window_size=3)["loss"], (sim,))


def test_excluded_negatives_get_no_gradient_and_empty_rows_stay_finite():
    sim, mask, relevance = make_batch(6, 8, seed=17)
    sim.requires_grad_()
    for threshold in (0.5, -2.0):  # -2: every negative left out, loss 0 with a finite, zero gradient
        out = bcls_loss(sim, mask, relevance, kendall_weight=0.0, false_negative_threshold=threshold)
        out["loss"].backward()
        excluded = ~mask & (relevance > threshold)
        assert torch.isfinite(sim.grad).all()
        assert (sim.grad[excluded] == 0).all()
        if threshold < -1:
            assert out["loss"].item() == 0.0 and (sim.grad == 0).all()
        sim.grad = None


def test_global_batch_count_reducer_and_explicit_t2i_matrices():
    """The weights follow each direction's own relevance matrix, as the global-batch loss passes them."""
    sim, mask, relevance = make_batch(6, 6, seed=19)
    kwargs = dict(false_negative_threshold=0.5, false_negative_ramp=0.2)
    implicit = bcls_loss(sim, mask, relevance, **kwargs)
    explicit = bcls_loss(sim, mask, relevance, sim_t2i=sim.T.clone(), positive_mask_t2i=mask.T.clone(),
                         relevance_t2i=relevance.T.clone(), **kwargs)
    for key in implicit:
        torch.testing.assert_close(implicit[key], explicit[key])


def test_bad_arguments_are_named():
    sim, mask, relevance = make_batch(4, 4, seed=23)
    with pytest.raises(ValueError, match="pass `relevance`"):
        bcls_loss(sim, mask, None, false_negative_threshold=0.5)
    with pytest.raises(ValueError, match="false_negative_ramp"):
        bcls_loss(sim, mask, relevance, false_negative_threshold=0.5, false_negative_ramp=-0.1)
    with pytest.raises(ValueError, match="false_negative_threshold"):
        bcls_loss(sim, mask, relevance, false_negative_threshold=float("inf"))
    with pytest.raises(ValueError, match=r"negative_weights.*\[0, 1\].*row 0, column 1"):
        triplet_sn_loss(sim, mask, negative_weights=torch.tensor([[1.0, 2.0, 1, 1]] + [[1.0] * 4] * 3))
    with pytest.raises(StrictDataclassError, match="false_negative_threshold"):
        BCLSConfig(false_negative_threshold=float("nan"))
    with pytest.raises(StrictDataclassError, match="false_negative_ramp"):
        BCLSConfig(false_negative_ramp=-1.0)


def test_config_carries_the_knobs_into_the_model_loss(tiny_bcls_model):
    config = BCLSConfig(false_negative_threshold=0.6, false_negative_ramp=0.1)
    assert config.loss_kwargs()["false_negative_threshold"] == 0.6
    reloaded = BCLSConfig.from_dict(config.to_dict())
    assert reloaded.false_negative_threshold == 0.6 and reloaded.false_negative_ramp == 0.1
    model = tiny_bcls_model
    model.config.false_negative_threshold, model.config.false_negative_ramp = 0.3, 0.0
    g = torch.Generator().manual_seed(0)
    n = 4
    pixel_values = torch.rand(n, 3, 32, 32, generator=g)
    input_ids = torch.randint(1000, 2000, (n, 6), generator=g)
    image_ids = torch.tensor([0, 1, 2, 3])
    relevance = torch.rand(n, n, generator=g)
    relevance.fill_diagonal_(1.0)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                image_ids=image_ids, relevance=relevance, return_loss=True)
    cosines = out.image_embeds @ out.text_embeds.T
    ref = bcls_loss(cosines, image_ids[:, None] == image_ids[None, :], relevance, **model.config.loss_kwargs())
    torch.testing.assert_close(out.loss, ref["loss"])
    model.config.false_negative_threshold = None
    plain = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  image_ids=image_ids, relevance=relevance, return_loss=True)
    assert not torch.allclose(out.loss_triplet, plain.loss_triplet)
