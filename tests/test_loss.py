"""Tests for training/loss.py: σ distributions and weights in closed form, and the FDM warm-up schedule."""

import math
import pickle

import pytest
import torch

from training import networks
from training.augment import AugmentPipe
from training.loss import EDMLoss, VELoss, VPLoss, WarmupSchedule

NUM_DRAWS = 200_000


class ZeroNet(torch.nn.Module):
    """A denoiser that always answers 0 and remembers its inputs, so the loss is w·y² in closed form."""

    def forward(self, x, sigma, class_labels=None):
        self.x, self.sigma, self.class_labels = x, sigma, class_labels
        return torch.zeros_like(x)


class AugmentAwareZeroNet(ZeroNet):
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.augment_labels = augment_labels
        return super().forward(x, sigma, class_labels)


def draw(loss_fn, num_images=NUM_DRAWS, seed=0):
    """Run the loss on all-ones 1-pixel images: returns (σ, loss) flat in float64; the loss equals the weight."""
    net = ZeroNet()
    torch.manual_seed(seed)
    loss = loss_fn(net, torch.ones([num_images, 1, 1, 1]))
    return net.sigma.double().flatten(), loss.double().flatten()


def assert_uniform(samples, low, high, tol=0.01):
    """The empirical CDF of `samples` stays within `tol` of the uniform distribution on [low, high]."""
    assert samples.min() >= low - 1e-6 * abs(low) and samples.max() <= high + 1e-6 * abs(high)
    quantiles = (samples.sort().values - low) / (high - low)
    expected = (torch.arange(len(samples), dtype=torch.float64) + 0.5) / len(samples)
    assert (quantiles - expected).abs().max() < tol


def test_edm_log_sigma_is_normal_with_p_mean_and_p_std():
    sigma, _ = draw(EDMLoss(P_mean=-0.7, P_std=1.5))
    assert sigma.log().mean().item() == pytest.approx(-0.7, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.5, abs=0.01)


def test_edm_weight_is_sigma_sq_plus_sigma_data_sq_over_sigma_sigma_data_sq():
    sigma, weight = draw(EDMLoss(sigma_data=0.3), num_images=1000)
    torch.testing.assert_close(weight, (sigma ** 2 + 0.3 ** 2) / (sigma * 0.3) ** 2, rtol=1e-5, atol=0)


def test_ve_log_sigma_is_uniform_between_log_sigma_min_and_log_sigma_max():
    sigma, _ = draw(VELoss(sigma_min=0.02, sigma_max=100))
    assert_uniform(sigma.log(), math.log(0.02), math.log(100))


def test_ve_weight_is_one_over_sigma_sq():
    sigma, weight = draw(VELoss(), num_images=1000)
    torch.testing.assert_close(weight, 1 / sigma ** 2, rtol=1e-5, atol=0)


def test_vp_sigma_is_vp_schedule_of_t_uniform_between_epsilon_t_and_one():
    beta_d, beta_min, epsilon_t = 19.9, 0.1, 1e-3
    sigma, _ = draw(VPLoss(beta_d=beta_d, beta_min=beta_min, epsilon_t=epsilon_t))
    t = ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d  # inverse schedule
    assert_uniform(t, epsilon_t, 1)


def test_vp_weight_is_one_over_sigma_sq():
    sigma, weight = draw(VPLoss(), num_images=1000)
    torch.testing.assert_close(weight, 1 / sigma ** 2, rtol=1e-5, atol=0)


def test_loss_is_weighted_squared_error_of_the_denoiser_on_noised_images():
    torch.manual_seed(1)
    images = torch.rand([64, 3, 4, 4]) * 2 - 1
    labels = torch.eye(10)[torch.randint(10, [64])]
    net = ZeroNet()
    loss = EDMLoss()(net, images, labels)
    sigma = net.sigma
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert sigma.shape == (64, 1, 1, 1) and loss.shape == images.shape
    torch.testing.assert_close(loss, weight * images ** 2)
    assert net.class_labels is labels
    noise = (net.x - images) / sigma
    assert noise.mean().abs() < 0.05 and (noise.std() - 1).abs() < 0.05


def test_loss_draws_from_the_global_rng():
    _, first = draw(EDMLoss(), num_images=16, seed=3)
    _, second = draw(EDMLoss(), num_images=16, seed=3)
    _, other = draw(EDMLoss(), num_images=16, seed=4)
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_loss_trains_on_augmented_images_and_passes_augment_labels():
    images = torch.full([4, 1, 2, 2], 0.5)
    augment_labels = torch.arange(36.0).reshape(4, 9)
    net = AugmentAwareZeroNet()
    loss = VELoss()(net, images, augment_pipe=lambda x: (-2 * x, augment_labels))
    torch.testing.assert_close(loss, (1 / net.sigma ** 2) * torch.ones_like(images))  # y = -1
    assert net.augment_labels is augment_labels


def saturated_loss(warmup_ite):
    """A loss whose weights (≥ 2.5e5) exceed every cap, so its value is the cap itself."""
    return VELoss(sigma_min=1e-3, sigma_max=2e-3, warmup_ite=warmup_ite)


def test_warmup_cap_grows_from_5_by_100_over_warmup_ite_steps_then_vanishes():
    schedule = WarmupSchedule(200)
    for step in range(200):
        assert schedule.cap(step) == pytest.approx(5 * 100 ** (step / 200), rel=1e-12)
    assert schedule.cap(199) < 500
    assert schedule.cap(200) is None and schedule.cap(10_000) is None


def test_warmup_caps_the_weight_at_each_optimizer_step_and_not_after():
    loss_fn = saturated_loss(warmup_ite=10)
    for step in range(13):
        _, weight = draw(loss_fn, num_images=8, seed=step)
        if step < 10:
            torch.testing.assert_close(weight, torch.full([8], 5 * 100 ** (step / 10), dtype=torch.float64))
        else:
            assert weight.min() > 2.4e5
        loss_fn.advance()


def test_the_step_given_with_each_call_sets_the_cap_and_the_recorded_step():
    loss_fn = saturated_loss(warmup_ite=10)
    for step in (7, 3, 3):
        torch.manual_seed(0)
        weight = loss_fn(ZeroNet(), torch.ones([8, 1, 1, 1]), step=step).double().flatten()
        torch.testing.assert_close(weight, torch.full([8], 5 * 100 ** (step / 10), dtype=torch.float64))
        assert loss_fn.state_dict() == {'step': step + 1}  # what a training state written after this step records


def test_warmup_cap_is_the_same_whatever_the_gradient_accumulation():
    def caps(calls_per_step):
        loss_fn = saturated_loss(warmup_ite=6)
        seen = []
        for step, num_calls in enumerate(calls_per_step):
            seen.append([draw(loss_fn, num_images=4, seed=step * 10 + i)[1] for i in range(num_calls)])
            loss_fn.advance()
        return seen

    single, accumulated = caps([1] * 8), caps([3, 1, 4, 2, 5, 2, 3, 1])
    for step, (reference, rounds) in enumerate(zip(single, accumulated)):
        for weight in rounds:
            if step < 6:
                torch.testing.assert_close(weight, reference[0], rtol=0, atol=0)
            else:
                assert weight.min() > 2.4e5


def test_warmup_step_is_restored_exactly_from_state_dict():
    trained = saturated_loss(warmup_ite=20)
    for _ in range(7):
        trained.advance()
    state = trained.state_dict()
    assert state == {'step': 7}
    resumed = saturated_loss(warmup_ite=20)
    resumed.load_state_dict(state)
    for _ in range(15):
        assert torch.equal(draw(trained, num_images=4, seed=5)[1], draw(resumed, num_images=4, seed=5)[1])
        trained.advance()
        resumed.advance()


def test_load_state_dict_rejects_a_bad_step():
    for state in [{}, {'step': -1}, {'step': 1.5}, {'step': True}, 3]:
        with pytest.raises(ValueError, match='step'):
            EDMLoss().load_state_dict(state)


def test_no_warmup_means_no_cap():
    _, weight = draw(saturated_loss(warmup_ite=None), num_images=8)
    assert weight.min() > 2.4e5
    assert WarmupSchedule(None).cap(0) is None


@pytest.mark.parametrize('warmup_ite', [0, -5, 2.5, '200', True])
def test_warmup_ite_must_be_a_positive_integer(warmup_ite):
    with pytest.raises(ValueError, match='warmup_ite'):
        EDMLoss(warmup_ite=warmup_ite)


@pytest.mark.parametrize('loss_class', [VPLoss, VELoss, EDMLoss])
def test_pickle_round_trip_keeps_arguments_and_step(loss_class):
    loss_fn = loss_class(warmup_ite=50)
    for _ in range(3):
        loss_fn.advance()
    restored = pickle.loads(pickle.dumps(loss_fn))
    assert type(restored) is loss_class
    assert restored.init_kwargs == {'warmup_ite': 50} and restored.step == 3
    assert restored.warmup.warmup_ite == 50


SMALL_NET = dict(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[8], dropout=0.0)


@pytest.mark.parametrize('precond, loss_class', [('FDM_EDMPrecond', EDMLoss), ('FDM_VPPrecond', VPLoss),
                                                 ('FDM_VEPrecond', VELoss)])
def test_trains_a_small_conditional_network_on_augmented_images(precond, loss_class):
    torch.manual_seed(8)
    net = getattr(networks, precond)(label_dim=10, augment_dim=9, **SMALL_NET).train()
    images = torch.rand([4, 3, 16, 16]) * 2 - 1
    labels = torch.eye(10)[torch.tensor([0, 3, 3, 9])]
    pipe = AugmentPipe(p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    loss = loss_class(warmup_ite=10)(net, images, labels, pipe)
    assert loss.shape == images.shape and torch.isfinite(loss).all()
    loss.sum().backward()
    assert net.model.map_augment.weight.grad.abs().sum() > 0  # the augmentation labels reached the network


def test_trains_a_network_without_augment_inputs_when_no_pipe_is_given():
    torch.manual_seed(9)
    net = networks.EDMPrecond(label_dim=0, **SMALL_NET)
    loss = EDMLoss()(net, torch.rand([2, 3, 16, 16]) * 2 - 1)
    assert loss.shape == (2, 3, 16, 16) and torch.isfinite(loss).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_draws_sigma_and_noise_on_the_images_device():
    device = torch.device('cuda')
    net = networks.FDM_EDMPrecond(label_dim=10, augment_dim=9, **SMALL_NET).to(device)
    images = torch.rand([4, 3, 16, 16], device=device) * 2 - 1
    labels = torch.eye(10, device=device)[:4]
    pipe = AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    loss = EDMLoss(warmup_ite=10)(net, images, labels, pipe)
    assert loss.device.type == 'cuda' and torch.isfinite(loss).all()
    loss.sum().backward()
