"""FGSM / PGD in [0, 1] pixel space on a small CNN trained on sklearn digits."""
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_app.perturb import Normalize, fgsm, pgd

EPS = 8 / 255
CAFFE = ((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255, 1 / 255, 1 / 255))
TF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def make_net() -> nn.Sequential:
    # the first conv has no padding, so a change of input normalisation folds into it exactly
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def digits():
    """sklearn digits upsampled to 16 x 16 RGB in [0, 1], and a tf-mode model trained on them."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(Normalize(*TF), make_net())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xtr, ytr = x[:1400], y[:1400]
    for step in range(200):
        i = torch.randint(0, len(xtr), (128,))
        loss = F.cross_entropy(model(xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x[1400:1600], y[1400:1600]


def loss_acc(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_model_learned(digits):
    model, x, y = digits
    assert loss_acc(model, x, y)[1] > 0.75


def test_fgsm_raises_loss_and_stays_in_budget(digits):
    model, x, y = digits
    adv = fgsm(model, x, y, eps=EPS)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    clean_loss, clean_acc = loss_acc(model, x, y)
    adv_loss, adv_acc = loss_acc(model, adv, y)
    assert adv_loss > 1.2 * clean_loss and adv_acc < clean_acc
    # a sign step: away from the [0, 1] bounds every pixel moves by eps (or 0 where grad = 0)
    moved = (adv - x).abs()[(x > EPS) & (x < 1 - EPS)]
    assert bool((((moved - EPS).abs() < 1e-6) | (moved == 0)).all()) and (moved > 0).float().mean() > 0.5


def test_pgd_in_budget_and_at_least_as_strong_as_fgsm(digits):
    model, x, y = digits
    adv = pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=10)
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    f_loss, f_acc = loss_acc(model, fgsm(model, x, y, eps=EPS), y)
    p_loss, p_acc = loss_acc(model, adv, y)
    assert p_loss >= f_loss and p_acc <= f_acc
    # larger budget, stronger attack
    assert loss_acc(model, pgd(model, x, y, eps=2 * EPS), y)[0] > p_loss


def test_attacks_leave_model_untouched_and_work_under_inference_mode(digits):
    model, x, y = digits
    params = [p.detach().clone() for p in model.parameters()]
    expected = pgd(model, x[:16], y[:16], steps=3, indices=torch.arange(16))
    with torch.inference_mode():
        xi, yi = x[:16].clone(), y[:16].clone()  # inference tensors
        got = pgd(model, xi, yi, steps=3, indices=torch.arange(16))
        got_fgsm = fgsm(model, xi, yi)
    with torch.no_grad():
        got_nograd = pgd(model, x[:16], y[:16], steps=3, indices=torch.arange(16))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_nograd, expected)
    torch.testing.assert_close(got_fgsm, fgsm(model, x[:16], y[:16]))
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    model.train()  # a model in train mode stays in train mode
    try:
        fgsm(model, x[:4], y[:4])
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


def test_pgd_random_start_is_seeded_per_sample(digits):
    model, x, y = digits
    idx = torch.arange(50, 58)
    start = pgd(model, x[:8], y[:8], steps=0, indices=idx, seed=4)  # the random start alone
    assert (start - x[:8]).abs().max() <= EPS + 1e-6 and not torch.equal(start, x[:8])
    for i in (0, 3, 7):
        one = pgd(model, x[i : i + 1], y[i : i + 1], steps=0, indices=idx[i : i + 1], seed=4)
        torch.testing.assert_close(one[0], start[i], atol=0, rtol=0)
    assert not torch.equal(start, pgd(model, x[:8], y[:8], steps=0, indices=idx, seed=5))
    assert torch.equal(pgd(model, x[:8], y[:8], steps=0, random_start=False), x[:8])


def test_same_pixel_eps_for_caffe_and_tf_models(digits):
    """Two models computing the same function with caffe vs tf normalisation get the same
    adversarial images: eps is a pixel budget, 8.0 in caffe input units, 16/255 in tf units."""
    tf_model, x, y = digits
    net = tf_model[1]
    caffe_net = make_net()
    caffe_net.load_state_dict(net.state_dict())
    (tf_mean, tf_std), (c_mean, c_std) = TF, CAFFE
    with torch.no_grad():  # tf_in = (caffe_in * c_std + c_mean - tf_mean) / tf_std, folded into conv 1
        a = torch.tensor(c_std) / torch.tensor(tf_std)
        b = (torch.tensor(c_mean) - torch.tensor(tf_mean)) / torch.tensor(tf_std)
        w = net[0].weight
        caffe_net[0].weight.copy_(w * a.view(1, 3, 1, 1))
        caffe_net[0].bias.copy_(net[0].bias + (w * b.view(1, 3, 1, 1)).sum(dim=(1, 2, 3)))
    caffe_model = nn.Sequential(Normalize(*CAFFE), caffe_net).eval()
    torch.testing.assert_close(caffe_model(x), tf_model(x), atol=1e-4, rtol=1e-4)
    for attack in (lambda m: fgsm(m, x, y), lambda m: pgd(m, x, y, indices=torch.arange(len(x)))):
        adv_tf, adv_caffe = attack(tf_model), attack(caffe_model)
        for adv in (adv_tf, adv_caffe):
            assert (adv - x).abs().max() <= EPS + 1e-6
        assert (adv_tf == adv_caffe).float().mean() > 0.99  # sign flips only where grad ~ 0
        d_caffe = caffe_model[0](adv_caffe) - caffe_model[0](x)
        d_tf = tf_model[0](adv_tf) - tf_model[0](x)
        assert d_caffe.abs().max().item() == pytest.approx(8.0, abs=1e-3)
        assert d_tf.abs().max().item() == pytest.approx(16 / 255, abs=1e-5)


def test_normalize_and_bad_arguments(digits):
    model, x, y = digits
    norm = Normalize(*CAFFE)
    torch.testing.assert_close(norm(x), (x - torch.tensor(CAFFE[0]).view(1, 3, 1, 1)) * 255)
    assert "mean=" in repr(norm)
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, eps=-1)
    with pytest.raises(ValueError, match="alpha"):
        pgd(model, x, y, alpha=0)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, steps=-1)
    with pytest.raises(ValueError, match="one target per image"):
        fgsm(model, x, y[:3])
    with pytest.raises(ValueError, match="indices"):
        pgd(model, x, y, indices=[1, 2])
