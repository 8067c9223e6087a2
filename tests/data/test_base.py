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
