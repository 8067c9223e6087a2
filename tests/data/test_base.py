"""Image augmentation (protege.data.base.augment_images, through kornia): seeded, and only shifts and flips."""
import torch

from protege.data.base import augment_images


def test_image_augmentation_is_seeded_and_only_shifts_and_flips():
    x = torch.rand(16, 3, 8, 8) + 1  # no zeros: any zero in the output is padding
    torch.manual_seed(0)
    a = augment_images(x)
    torch.manual_seed(0)
    assert torch.equal(a, augment_images(x)) and a.shape == x.shape
    assert not torch.equal(a, augment_images(x))  # the generator moved on: another draw
    for out, inp in zip(a, x):  # every output is the input shifted by at most 2 pixels, maybe mirrored
        ok = any(torch.equal(out[:, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)],
                             img[:, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)])
                 for img in (inp, inp.flip(-1)) for dy in range(-2, 3) for dx in range(-2, 3))
        assert ok


def test_fixed_views_are_the_same_shifts_and_flips_every_time():
    from protege.data.views import Views

    x = torch.zeros(64, 1, 6, 6)
    x[:, 0, 2, 1] = 1.0  # one lit pixel at row 2, column 1
    views = Views(64, 3, pad=2)
    a = views.apply(x, torch.arange(64), 1)
    assert torch.equal(a, Views(64, 3, pad=2).apply(x, torch.arange(64), 1))  # fixed by the seed
    assert not torch.equal(a, views.apply(x, torch.arange(64), 0))  # another view, other shifts
    assert not torch.equal(a, Views(64, 3, seed=1, pad=2).apply(x, torch.arange(64), 1))
    dy, dx, flip = views.params(1)
    assert 0 < flip.sum() < 64 and set(dy.tolist()) <= set(range(5))
    for i in range(64):  # the pixel moves by the crop offset (zero padding 2), then mirrors where flipped
        row, col = 2 + 2 - int(dy[i]), 1 + 2 - int(dx[i])
        if flip[i]:
            col = 5 - col
        lit = (a[i, 0] == 1).nonzero().tolist()
        assert lit == ([[row, col]] if 0 <= row < 6 and 0 <= col < 6 else [])
        assert a[i].sum() == len(lit)  # nothing else appears
    sub = views.apply(x[[5, 9]], torch.tensor([5, 9]), 1)  # an example looks the same in any batch
    assert torch.equal(sub, a[[5, 9]])
    inputs = views.inputs(x)  # all views in one sequence: row v * 64 + i is example i in view v
    assert len(inputs) == 192 and torch.equal(inputs[60:70][4:], a[:6]) and torch.equal(inputs[64:128], a)
