import numpy as np
import pytest
import torch
from PIL import Image

from pml_loop.data import transforms as T


def _image(h=20, w=30):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_to_tensor_and_normalize():
    img = _image()
    x = T.ToTensor()(img)
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    assert torch.allclose(x[:, 2, 5] * 255, torch.tensor(np.asarray(img)[2, 5], dtype=torch.float32))
    y = T.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])(x)
    assert torch.allclose(y, (x - 0.5) / 0.25)
    assert T.ToTensor()(Image.new("L", (4, 5))).shape == (1, 5, 4)
    with pytest.raises(ValueError, match="std"):
        T.Normalize([0.0], [0.0])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_resize_and_center_crop(as_tensor):
    img = _image(20, 30)
    if as_tensor:
        img = T.ToTensor()(img)
    out = T.Resize(10)(img)
    assert T.ToTensor()(out).shape[-2:] == (10, 15)  # shorter side 10, aspect kept
    out = T.Resize((7, 9))(img)
    assert T.ToTensor()(out).shape[-2:] == (7, 9)
    out = T.CenterCrop(8)(img)
    crop = T.ToTensor()(out)
    assert crop.shape[-2:] == (8, 8)
    full = T.ToTensor()(img)
    assert torch.equal(crop, full[:, 6:14, 11:19])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_random_resized_crop_size_and_box(as_tensor):
    torch.manual_seed(0)
    img = _image(40, 50)
    if as_tensor:
        img = T.ToTensor()(img)
    t = T.RandomResizedCrop(16, scale=(0.3, 0.6))
    for _ in range(5):
        assert T.ToTensor()(t(img)).shape[-2:] == (16, 16)
        top, left, h, w = t.sample_box(40, 50)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 50
        assert 0.2 * 2000 <= h * w <= 0.7 * 2000


def test_random_horizontal_flip():
    x = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(T.RandomHorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(p=0.0)(x), x)
    img = _image(4, 6)
    flipped = T.RandomHorizontalFlip(p=1.0)(img)
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])


def test_shift_moves_content_without_wrapping():
    x = torch.zeros(1, 5, 5)
    x[0, 0, 0] = 1.0
    moved = T.shift(x, 2, 1)
    assert moved[0, 2, 1] == 1.0 and moved.sum() == 1.0
    back = T.shift(x, -1, 0)  # pushes the only ink out of the image
    assert back.sum() == 0.0


def test_random_shift_bounds_and_compose():
    torch.manual_seed(0)
    x = torch.zeros(1, 9, 9)
    x[0, 4, 4] = 1.0
    t = T.Compose([T.RandomShift(2)])
    seen = set()
    for _ in range(50):
        y = t(x)
        (r, c), = (y[0] == 1.0).nonzero().tolist()
        assert abs(r - 4) <= 2 and abs(c - 4) <= 2
        seen.add((r, c))
    assert len(seen) > 5  # it really is random
    with pytest.raises(TypeError, match="ToTensor"):
        T.RandomShift(1)(_image())
