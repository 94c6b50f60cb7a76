import torch

from utils.mi.patterns import Selection, attack_succeeded, masked_mean, predict, select_samples, split_patterns


def test_split_patterns_detached():
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    x_adv = x + 0.1 * torch.randn_like(x)
    nat, adv = split_patterns(x, x_adv)
    assert not nat.requires_grad and not adv.requires_grad
    torch.testing.assert_close(nat, x.detach())
    torch.testing.assert_close(adv, (x_adv - x).detach())
    torch.testing.assert_close(nat + adv, x_adv.detach())


def test_masks_on_hand_built_logits():
    y = torch.tensor([0, 1, 2, 0, 1])
    logits_nat = torch.tensor(
        [[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5]]
    )  # preds 0 1 1 0 2: correct = T T F T F
    logits_adv = torch.tensor(
        [[5.0, 0, 0], [5, 0, 0], [0, 0, 5], [0, 5, 0], [5, 0, 0]]
    )  # preds 0 0 2 1 0: fooled = F T F T T (the last one was already wrong on x)
    sel = select_samples(logits_nat, logits_adv, y)
    assert isinstance(sel, Selection)
    assert sel.correct.tolist() == [True, True, False, True, False]
    assert sel.right.tolist() == [True, False, False, False, False]
    assert sel.wrong.tolist() == [False, True, False, True, False]
    assert attack_succeeded(logits_adv, y).tolist() == [False, True, False, True, True]
    # R and W partition C.
    assert torch.equal(sel.right | sel.wrong, sel.correct)
    assert not (sel.right & sel.wrong).any()


def test_argmax_is_over_classes_not_batch():
    logits = torch.tensor([[3.0, 2.0], [10.0, 0.0]])
    buggy = torch.softmax(logits, dim=0).argmax(dim=1)  # the release's prediction
    assert predict(logits).tolist() == [0, 0]
    assert buggy.tolist() != [0, 0]
    y = torch.tensor([0, 0])
    sel = select_samples(logits, logits, y)
    assert sel.correct.all() and sel.right.all() and not sel.wrong.any()


def test_empty_sets():
    y = torch.tensor([1, 1])
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # everything misclassified
    sel = select_samples(logits, logits, y)
    assert not sel.correct.any() and not sel.right.any() and not sel.wrong.any()


def test_masked_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    assert masked_mean(values, mask).item() == 2.0

    empty = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()  # still attached to the graph
    assert torch.equal(values.grad, torch.zeros(4))


def test_masked_mean_ignores_non_finite_outside_mask():
    values = torch.tensor([1.0, float("inf"), float("nan"), 3.0], requires_grad=True)
    mask = torch.tensor([True, False, False, True])
    out = masked_mean(values, mask)
    out.backward()
    assert out.item() == 2.0
    assert torch.isfinite(values.grad).all()


def test_release_rule_takes_the_softmax_over_the_batch():
    # Sample 0 prefers class 0 by its own logits, but class 1 ranks it higher against the batch.
    logits_nat = torch.tensor([[2.0, 1.0], [5.0, -3.0], [4.0, -1.0]])
    y = torch.tensor([0, 0, 0])
    assert predict(logits_nat).tolist() == [0, 0, 0]
    by_hand = (logits_nat - torch.logsumexp(logits_nat, dim=0)).argmax(dim=1)  # softmax over dim 0, then argmax
    assert predict(logits_nat, over_batch=True).tolist() == by_hand.tolist() == [1, 0, 0]
    logits_adv = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 0.5]])  # by classes: samples 0 and 2 fooled
    ours = select_samples(logits_nat, logits_adv, y)
    release = select_samples(logits_nat, logits_adv, y, over_batch=True)
    assert ours.wrong.tolist() == [True, False, True]
    assert release.correct.tolist() == [False, True, True]
    assert release.wrong.tolist() != ours.wrong.tolist()
    assert torch.equal(release.right | release.wrong, release.correct)
