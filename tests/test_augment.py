"""Tests for training/augment.py: exact flips and identity, the 9-label layout, warps that match their labels."""

import pickle

import pytest
import torch

from training.augment import LABEL_NAMES, AugmentPipe, warp

EVERY_TRANSFORM = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # as train.py


def smooth_function(x, y):
    """A smooth test pattern over centred pixel coordinates, within [-0.9, 0.9]."""
    return 0.5 * torch.sin(0.3 * x + 0.2 * y + 0.3) + 0.4 * torch.cos(0.15 * x - 0.25 * y)


def centred_grid(size):
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(coords, coords, indexing='ij')
    return x, y


def smooth_images(num_images, size=32):
    x, y = centred_grid(size)
    return smooth_function(x, y).expand(num_images, 3, size, size).clone()


def random_smooth_images(num_images, size=16, mean=0.3):
    """Random low-frequency images within [-1, 1], a stand-in for natural images."""
    coarse = torch.rand([num_images, 3, 4, 4]) * 1.2 - 0.6 + mean
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode='bicubic', align_corners=False).clamp(-1, 1)


def test_p_zero_is_the_identity_with_zero_labels():
    images = torch.rand([16, 3, 16, 16]) * 2 - 1
    out, labels = AugmentPipe(p=0, **EVERY_TRANSFORM)(images)
    assert torch.equal(out, images)
    assert labels.shape == (16, 9) and labels.dtype == torch.float32 and torch.count_nonzero(labels) == 0


@pytest.mark.parametrize('name, dim, column', [('xflip', 3, 0), ('yflip', 2, 1)])
def test_flip_is_exact_and_labelled(name, dim, column):
    torch.manual_seed(0)
    images = torch.rand([64, 3, 8, 8]) * 2 - 1
    out, labels = AugmentPipe(p=1, **{name: 1})(images)
    flipped = labels[:, column] == 1
    assert torch.equal(out[flipped], images[flipped].flip(dim))
    assert torch.equal(out[~flipped], images[~flipped])
    assert set(labels[:, column].tolist()) == {0.0, 1.0}
    assert torch.count_nonzero(labels[:, [i for i in range(9) if i != column]]) == 0


def test_xflip_multiplier_makes_every_image_eligible_for_a_fair_flip():
    torch.manual_seed(1)
    _, labels = AugmentPipe(p=0.01, xflip=1e8)(torch.zeros([2000, 1, 2, 2]))
    assert 0.45 < labels[:, 0].mean() < 0.55


def test_there_are_nine_labels_in_the_published_order():
    assert LABEL_NAMES == ('xflip', 'yflip', 'scale', 'rotate_cos_minus_1', 'rotate_sin', 'aniso_cos', 'aniso_sin',
                           'translate_x', 'translate_y')
    assert AugmentPipe.augment_dim == 9


@pytest.mark.parametrize('name, columns', [('xflip', [0]), ('yflip', [1]), ('scale', [2]), ('rotate_frac', [3, 4]),
                                           ('aniso', [5, 6]), ('translate_frac', [7, 8])])
def test_each_transform_writes_only_its_own_label_columns(name, columns):
    torch.manual_seed(2)
    _, labels = AugmentPipe(p=1, **{name: 1})(random_smooth_images(32, size=8))
    assert labels.shape == (32, 9)
    others = [i for i in range(9) if i not in columns]
    assert torch.count_nonzero(labels[:, others]) == 0
    assert torch.count_nonzero(labels[:, columns]) > 0


def test_rotation_labels_are_cos_minus_one_and_sin_of_one_angle():
    torch.manual_seed(3)
    _, labels = AugmentPipe(p=1, rotate_frac=1)(torch.zeros([256, 1, 2, 2]))
    torch.testing.assert_close((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(256))
    angle = torch.atan2(labels[:, 4], labels[:, 3] + 1)
    assert angle.min() < -2.8 and angle.max() > 2.8  # full circle


def test_label_distributions():
    torch.manual_seed(4)
    _, labels = AugmentPipe(p=1, scale=1, aniso=1, translate_frac=1)(torch.zeros([4000, 1, 2, 2]))
    for column in [2, 7, 8]:  # standard normal draws; the std of each transform is applied to the image only
        assert abs(labels[:, column].mean()) < 0.06 and abs(labels[:, column].std() - 1) < 0.06
    rotated_frame = labels[:, 6] != 0
    assert 0.45 < rotated_frame.float().mean() < 0.55
    assert abs((labels[:, 5].square() + labels[:, 6].square()).mean() - 1) < 0.05


def expected_warp(labels, size, aniso_sign=1, scale_std=0.2, aniso_std=0.2, translate_frac_std=0.125):
    """Output → input map of each image, rebuilt from its labels: scale, then rotate, aniso, translate.

    The aniso labels (w·cos r, w·sin r) cannot tell (w, r) from (−w, r + π), which stretch along
    perpendicular axes (a quirk of the published layout); `aniso_sign` picks one of the two readings.
    """
    def matrix(a, b, c, d):
        return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)

    zero = torch.zeros(len(labels))
    inv_scale = torch.exp2(-labels[:, 2] * scale_std)
    cos, sin = labels[:, 3] + 1, labels[:, 4]
    strength, frame = labels[:, 5:7].norm(dim=1) * aniso_sign, torch.atan2(labels[:, 6], labels[:, 5])
    aniso = torch.exp2(strength * aniso_std)
    frame_cos, frame_sin = frame.cos(), frame.sin()
    linear = (matrix(inv_scale, zero, zero, inv_scale) @ matrix(cos, -sin, sin, cos)
              @ matrix(frame_cos, frame_sin, -frame_sin, frame_cos) @ matrix(1 / aniso, zero, zero, aniso)
              @ matrix(frame_cos, -frame_sin, frame_sin, frame_cos))
    shift = -labels[:, 7:9] * (size * translate_frac_std)
    return linear, (linear @ shift[:, :, None])[:, :, 0]


def warp_error(out, labels, aniso_sign):
    """Largest error per image of `out` against the test pattern moved as `labels` say, away from borders."""
    size = out.shape[-1]
    linear, offset = expected_warp(labels, size, aniso_sign)
    x, y = centred_grid(size)
    flip_x = torch.where(labels[:, 0] == 1, -1.0, 1.0)[:, None, None]
    flip_y = torch.where(labels[:, 1] == 1, -1.0, 1.0)[:, None, None]
    source_x = linear[:, 0, 0, None, None] * x + linear[:, 0, 1, None, None] * y + offset[:, 0, None, None]
    source_y = linear[:, 1, 0, None, None] * x + linear[:, 1, 1, None, None] * y + offset[:, 1, None, None]
    expected = smooth_function(flip_x * source_x, flip_y * source_y)  # flips act first, on the input
    border = (size - 1) / 2 - 4  # reflect padding and filter tails differ from the pattern near the edges
    inside = (source_x.abs() < border) & (source_y.abs() < border) & (x.abs() < border) & (y.abs() < border)
    assert (inside.sum(dim=(1, 2)) > 50).all()
    return ((out - expected[:, None]).abs().amax(dim=1) * inside).amax(dim=(1, 2))


def test_warps_move_the_image_as_their_labels_say():
    torch.manual_seed(5)
    out, labels = AugmentPipe(p=1, **EVERY_TRANSFORM)(smooth_images(32, size=32))
    error = torch.minimum(warp_error(out, labels, aniso_sign=1), warp_error(out, labels, aniso_sign=-1))
    assert error.max() < 0.01


def test_aniso_in_the_unrotated_frame_is_read_from_its_label():
    torch.manual_seed(6)
    out, labels = AugmentPipe(p=1, aniso=1, aniso_rotate_prob=0)(smooth_images(16, size=32))
    assert torch.count_nonzero(labels[:, 6]) == 0
    torch.testing.assert_close(labels[:, 5].abs(), labels[:, 5:7].norm(dim=1))
    signed = torch.where(labels[:, 5] >= 0, 1, -1)
    assert warp_error(out, labels, aniso_sign=1)[signed > 0].max() < 0.01
    assert warp_error(out, labels, aniso_sign=-1)[signed < 0].max() < 0.01


def test_identity_warp_reproduces_the_image():
    images = torch.rand([4, 3, 16, 16]) * 2 - 1
    torch.testing.assert_close(warp(images, torch.eye(3).repeat(4, 1, 1)), images, rtol=0, atol=1e-5)


def test_untransformed_images_of_a_batch_stay_bit_exact():
    torch.manual_seed(6)
    images = torch.rand([64, 3, 8, 8]) * 2 - 1
    out, labels = AugmentPipe(p=0.2, scale=1, rotate_frac=1, translate_frac=1)(images)
    untouched = (labels == 0).all(dim=1)
    assert 0 < untouched.sum() < 64
    assert torch.equal(out[untouched], images[untouched])


def test_moderate_p_keeps_range_and_batch_mean():
    torch.manual_seed(7)
    images = random_smooth_images(64)
    out, labels = AugmentPipe(p=0.5, **EVERY_TRANSFORM)(images)
    assert (labels[:, 2:] != 0).any(dim=1).float().mean() > 0.7
    assert out.min() >= -1.05 and out.max() <= 1.05
    assert abs(out.mean() - images.mean()) < 0.03


def test_deterministic_under_manual_seed():
    images = random_smooth_images(8)
    pipe = AugmentPipe(p=0.5, **EVERY_TRANSFORM)
    results = []
    for seed in [11, 11, 12]:
        torch.manual_seed(seed)
        results.append(pipe(images))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][1], results[2][1])


def test_pickle_round_trip_keeps_the_options():
    pipe = AugmentPipe(p=0.12, **EVERY_TRANSFORM)
    restored = pickle.loads(pickle.dumps(pipe))
    assert type(restored) is AugmentPipe and restored.init_kwargs == dict(p=0.12, **EVERY_TRANSFORM)
    assert vars(restored) == vars(pipe)


@pytest.mark.parametrize('kwargs', [dict(p=1.5), dict(p=-0.1), dict(scale=-1), dict(aniso_rotate_prob=2)])
def test_bad_options_raise_value_error_naming_them(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AugmentPipe(**kwargs)


def test_images_must_be_a_batch():
    with pytest.raises(ValueError, match=r'\[N,C,H,W\]'):
        AugmentPipe(p=1, xflip=1)(torch.zeros([3, 8, 8]))


def assert_pipe_is_flips_then_the_warp_its_labels_describe(device):
    """Rebuild the pipe's output on the CPU from its labels (frames unrotated: aniso labels then unambiguous)."""
    torch.manual_seed(13)
    images = random_smooth_images(16).to(device)
    out, labels = AugmentPipe(p=0.5, **EVERY_TRANSFORM, aniso_rotate_prob=0)(images)
    assert out.device == images.device and labels.device == images.device
    labels, rebuilt = labels.cpu(), images.cpu().clone()
    flips_x, flips_y = labels[:, 0] == 1, labels[:, 1] == 1
    rebuilt[flips_x] = rebuilt[flips_x].flip(3)
    rebuilt[flips_y] = rebuilt[flips_y].flip(2)
    linear, offset = expected_warp(labels, 16, aniso_sign=torch.where(labels[:, 5] >= 0, 1.0, -1.0))
    matrices = torch.eye(3).repeat(16, 1, 1)
    matrices[:, :2, :2], matrices[:, :2, 2] = linear, offset
    warped = (labels[:, 2:] != 0).any(dim=1)
    assert 0 < warped.sum() < 16
    rebuilt[warped] = warp(rebuilt[warped], matrices[warped])
    torch.testing.assert_close(out.cpu(), rebuilt, rtol=0, atol=1e-4)


def test_pipe_is_flips_then_the_warp_its_labels_describe():
    assert_pipe_is_flips_then_the_warp_its_labels_describe(torch.device('cpu'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_runs_on_cuda_like_on_cpu():
    assert_pipe_is_flips_then_the_warp_its_labels_describe(torch.device('cuda'))
    images = random_smooth_images(16).cuda()
    identity, zero_labels = AugmentPipe(p=0, **EVERY_TRANSFORM)(images)
    assert torch.equal(identity, images) and torch.count_nonzero(zero_labels) == 0


def test_reduced_precision_autocast_leaves_the_augmentation_in_fp32():
    pipe = AugmentPipe(p=1, xflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    images = torch.randn([8, 3, 16, 16])
    torch.manual_seed(5)
    expected, expected_labels = pipe(images)
    torch.manual_seed(5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        augmented, labels = pipe(images)
    assert augmented.dtype == torch.float32
    assert torch.equal(augmented, expected) and torch.equal(labels, expected_labels)
