"""L_cl (tri-map contrastive), EZ-VSL's loss and L_geo: hand-computed values, a naive reference, behaviour."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslt_cli.losses import OBJECTIVES, equivariance_loss, ezvsl_loss, tie_contrastive_loss


def naive_tie_loss(v: torch.Tensor, a: torch.Tensor, eps_pos: float, eps_neg: float, tau: float,
                   temperature: float) -> tuple[float, list[list[float]]]:
    """REFERENCE.md section 2 written with Python loops and floats, one cell at a time."""
    batch, channels, height, width = v.shape

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0

    def cos(i: int, j: int, y: int, x: int) -> float:
        return sum(float(v[i, c, y, x]) * float(a[j, c]) for c in range(channels))

    def weighted(i: int, j: int, weight) -> float:
        num = den = 0.0
        for y in range(height):
            for x in range(width):
                value = cos(i, j, y, x)
                num += weight(value) * value
                den += weight(value)
        return num / den

    all_logits, total = [], 0.0
    for i in range(batch):
        pos = weighted(i, i, lambda s: sigmoid((s - eps_pos) / tau))
        hard = weighted(i, i, lambda s: 1.0 - sigmoid((s - eps_neg) / tau))
        easy = [weighted(i, j, lambda s: sigmoid((s - eps_pos) / tau)) * (1 - 100 * (i == j)) for j in range(batch)]
        logits = [x / temperature for x in [pos, *easy, hard]]
        peak = max(logits)
        log_z = peak + math.log(sum(math.exp(x - peak) for x in logits))
        total += log_z - logits[0]
        all_logits.append(logits)
    return total / batch, all_logits


def unit(*xs: float) -> list[float]:
    norm = math.sqrt(sum(x * x for x in xs))
    return [x / norm for x in xs]


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """B=2, C=2, 2x2 maps whose cosines are chosen by hand (cells listed row-major)."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v0 = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]           # with a0: 1, 1, 0, 0.6   with a1: 0, 0, 1, 0.8
    v1 = [[0.0, 1.0], [0.0, 1.0], unit(0.9, math.sqrt(0.19)), [-1.0, 0.0]]  # a1: 1, 1, .436, 0   a0: 0, 0, .9, -1
    v = torch.tensor([v0, v1]).permute(0, 2, 1).reshape(2, 2, 2, 2)
    return v, a


def test_tie_loss_hand_computed_with_binary_masks():
    # With tau = 1e-4 every cell is at least 0.035 from a threshold, so the sigmoid masks are exactly 0 or 1:
    # image 0: pos = mean(1, 1) = 1, hard_neg = mean(0) = 0 (0.6 is in the ignored band), easy_01 = mean(1, .8) = .9
    # image 1: pos = 1, hard_neg = mean(0) = 0 (.436 ignored), easy_10 = .9; the diagonal becomes -99 * 1.
    v, a = hand_case()
    loss, parts = tie_contrastive_loss(v, a, eps_pos=0.65, eps_neg=0.40, tau=1e-4, temperature=0.07)
    expected_logits = torch.tensor([[1.0, -99.0, 0.9, 0.0], [1.0, 0.9, -99.0, 0.0]]) / 0.07
    torch.testing.assert_close(parts["logits"], expected_logits, rtol=0, atol=1e-4)
    row = math.log(1 + math.exp(-0.1 / 0.07) + math.exp(-1 / 0.07) + math.exp(-100 / 0.07))
    assert loss.item() == pytest.approx(row, rel=1e-5)
    assert parts["acc1"].item() == 1.0
    assert parts["pos"].item() == pytest.approx(1.0)
    assert parts["hard_neg"].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(parts["map"][0, 0], torch.tensor([[1.0, 1.0], [0.0, 0.6]]))


def test_tie_loss_matches_naive_loop_at_default_settings():
    v, a = hand_case()
    loss, parts = tie_contrastive_loss(v, a)
    ref_loss, ref_logits = naive_tie_loss(v.double(), a.double(), 0.65, 0.40, 0.03, 0.07)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(parts["logits"], torch.tensor(ref_logits, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_tie_loss_matches_naive_loop_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(3, 4, 3, 2, generator=gen), dim=1)
    a = F.normalize(torch.randn(3, 4, generator=gen), dim=1)
    # A wider tau keeps the masks soft so every cell counts in the comparison.
    loss, parts = tie_contrastive_loss(v, a, eps_pos=0.3, eps_neg=-0.1, tau=0.2, temperature=0.1)
    ref_loss, ref_logits = naive_tie_loss(v.double(), a.double(), 0.3, -0.1, 0.2, 0.1)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(parts["logits"], torch.tensor(ref_logits, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_diagonal_is_minus_99_times_the_positive_and_other_columns_follow_the_audio_order():
    gen = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(4, 8, 5, 5, generator=gen), dim=1)
    a = F.normalize(torch.randn(4, 8, generator=gen), dim=1)
    _, parts = tie_contrastive_loss(v, a)
    logits = parts["logits"]
    diagonal = logits[:, 1:5].diagonal()
    torch.testing.assert_close(diagonal, -99.0 * logits[:, 0])
    # Easy negative (i, j) depends only on image i and audio j: the off-diagonal entries of a smaller batch agree.
    _, sub = tie_contrastive_loss(v[:2], a[:2])
    torch.testing.assert_close(sub["logits"][0, 2], logits[0, 2])
    torch.testing.assert_close(sub["logits"][1, 1], logits[1, 1])
    # Without the hard negative the last column is gone and the rest is unchanged.
    _, no_hard = tie_contrastive_loss(v, a, hard_negative=False)
    torch.testing.assert_close(no_hard["logits"], logits[:, :-1])


def aligned_batch(batch: int = 8, channels: int = 16, size: int = 7, seed: int = 0):
    """Images whose top-left 3x3 region carries their own audio's embedding; the rest is noise."""
    gen = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(batch, channels, generator=gen), dim=1)
    v = torch.randn(batch, channels, size, size, generator=gen) * 0.3
    v[:, :, :3, :3] += a[:, :, None, None] * 3.0
    return F.normalize(v, dim=1), a


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_aligned_pairs_score_lower_than_shuffled(name):
    v, a = aligned_batch()
    shuffled = a[torch.roll(torch.arange(a.shape[0]), 1)]
    aligned_loss, parts = OBJECTIVES[name].loss(v, a)
    shuffled_loss, shuffled_parts = OBJECTIVES[name].loss(v, shuffled)
    assert aligned_loss.item() < shuffled_loss.item() - 1.0
    assert parts["acc1"].item() == 1.0
    assert shuffled_parts["acc1"].item() < 0.5
    assert parts["map"].shape == (8, 1, 7, 7)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_a_few_adam_steps_lower_the_loss(name):
    gen = torch.Generator().manual_seed(2)
    v_raw = torch.randn(6, 8, 4, 4, generator=gen).requires_grad_()
    a_raw = torch.randn(6, 8, generator=gen).requires_grad_()
    optimiser = torch.optim.Adam([v_raw, a_raw], lr=0.05)
    losses = []
    for _ in range(30):
        loss, _ = OBJECTIVES[name].loss(F.normalize(v_raw, dim=1), F.normalize(a_raw, dim=1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tie_loss_stays_finite_when_every_cell_matches_and_under_bfloat16():
    a = F.normalize(torch.randn(4, 8), dim=1)
    v = a[:, :, None, None].expand(4, 8, 3, 3).contiguous()
    loss, parts = tie_contrastive_loss(v, a)
    assert torch.isfinite(loss)
    assert parts["hard_neg"].item() == pytest.approx(1.0, abs=1e-3)
    loss_bf16, _ = tie_contrastive_loss(v.bfloat16(), a.bfloat16())
    assert loss_bf16.dtype == torch.float32 and torch.isfinite(loss_bf16)


def test_tie_map_carries_gradient_for_l_geo():
    v, a = aligned_batch(batch=3)
    v.requires_grad_()
    _, parts = tie_contrastive_loss(v, a)
    parts["map"].sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_ezvsl_loss_matches_a_direct_computation():
    v, a = hand_case()
    loss, parts = ezvsl_loss(v, a, temperature=0.1)
    # max over cells: image 0 with audio 0 = 1, with audio 1 = 1; image 1 with audio 0 = .9, with audio 1 = 1.
    scores = torch.tensor([[1.0, 1.0], [0.9, 1.0]]) / 0.1
    target = torch.arange(2)
    expected = F.cross_entropy(scores, target) + F.cross_entropy(scores.t(), target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(parts["logits"], scores)


def test_equivariance_loss_values_and_resize():
    pred = torch.zeros(2, 1, 4, 4)
    target = torch.full((2, 1, 4, 4), 0.5)
    assert equivariance_loss(pred, target).item() == pytest.approx(0.25)
    assert equivariance_loss(target, target).item() == 0.0
    # A constant 3x3 target resized to 4x4 stays constant.
    assert equivariance_loss(torch.full((2, 1, 4, 4), 0.5), torch.full((2, 1, 3, 3), 0.5)).item() == pytest.approx(0)


# --- the registry of objectives ---------------------------------------------------------------------------------------

def test_the_schema_names_the_objectives_of_the_registry():
    """One name per objective: the recipe schema's loss sections and the registry's entries are the same set, each
    entry's section is the schema's, and every parameter its section holds is a keyword of its loss function."""
    import inspect

    from sslt_cli.config import LOSS_SECTIONS, Recipe, valid_keys

    assert list(OBJECTIVES) == list(LOSS_SECTIONS)
    for name, entry in OBJECTIVES.items():
        section = LOSS_SECTIONS[name]
        assert entry.section is section and section.model_fields["objective"].default == name
        defaults = section()
        assert set(defaults.parameters()) <= set(inspect.signature(entry.loss).parameters), name
        assert Recipe.model_validate({"loss": {"objective": name}}).loss == defaults
    assert {key.split(".", 1)[1] for key in valid_keys() if key.startswith("loss.")} == {
        field for section in LOSS_SECTIONS.values() for field in section.model_fields}


def test_build_objective_binds_each_objectives_own_parameters():
    from sslt_cli.config import EzvslLoss, TieLoss
    from sslt_cli.losses import build_objective

    v, a = aligned_batch()
    tie = TieLoss(eps_pos=0.6, tau=0.05, temperature=0.1)
    assert build_objective(tie)(v, a)[0] == tie_contrastive_loss(v, a, eps_pos=0.6, eps_neg=0.4, tau=0.05,
                                                                 temperature=0.1)[0]
    ezvsl = EzvslLoss(temperature=0.03)
    assert build_objective(ezvsl)(v, a)[0] == ezvsl_loss(v, a, temperature=0.03)[0]
    assert (OBJECTIVES["tie"].validation_loss, OBJECTIVES["ezvsl"].validation_loss) == (True, False)
