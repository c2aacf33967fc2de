import pytest
import torch
from torch import nn

from pml_loop.models import MLP, GlyphCNN, import_object, load_trunk


@pytest.mark.parametrize("side", [16, 32])
def test_glyph_cnn_shapes(side):
    torch.manual_seed(0)
    model = GlyphCNN(out_dim=64)
    assert model(torch.rand(5, 1, side, side)).shape == (5, 64)
    plain = GlyphCNN(channels=(8, 8, 16, 24))
    assert plain(torch.rand(2, 1, side, side)).shape == (2, 24) and plain.output_size == 24


def test_glyph_cnn_trains():
    torch.manual_seed(0)
    model = GlyphCNN(channels=(8, 8, 8, 8), out_dim=2)
    x, y = torch.rand(16, 1, 16, 16), torch.randint(0, 2, (16,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.7


def test_mlp_sizes():
    mlp = MLP([10, 20, 5])
    assert mlp(torch.rand(3, 10)).shape == (3, 5) and mlp.output_size == 5
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 20), (20, 5)]
    assert not isinstance(list(mlp.net)[-1], nn.ReLU)
    assert isinstance(list(MLP([4, 4], final_relu=True).net)[-1], nn.ReLU)
    lazy = MLP([7])
    assert lazy(torch.rand(2, 13)).shape == (2, 7)
    with pytest.raises(ValueError):
        MLP([])


def test_import_object():
    assert import_object("pml_loop.models.GlyphCNN") is GlyphCNN
    assert import_object("torch.nn.Linear") is nn.Linear
    with pytest.raises(ImportError, match="NoSuchThing"):
        import_object("torch.nn.NoSuchThing")
    with pytest.raises(ImportError):
        import_object("no_such_package_xyz.Model")


def test_load_trunk_weights_and_strip(tmp_path):
    torch.manual_seed(0)
    source = GlyphCNN(channels=(4, 4, 4, 4), out_dim=10)
    plain_path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain_path)
    ckpt_path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "epoch": 3}, ckpt_path)

    x = torch.rand(2, 1, 16, 16)
    source.eval()
    for path in (plain_path, ckpt_path):
        model = load_trunk("pml_loop.models.GlyphCNN", weights=path,
                           channels=(4, 4, 4, 4), out_dim=10).eval()
        assert torch.allclose(model(x), source(x))

    stripped = load_trunk("pml_loop.models.GlyphCNN", weights=plain_path,
                          strip_classifier="fc", channels=(4, 4, 4, 4), out_dim=10).eval()
    assert isinstance(stripped.fc, nn.Identity)
    assert stripped(x).shape == (2, 4)


def test_load_trunk_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_trunk("pml_loop.models.GlyphCNN", weights=tmp_path / "missing.pt")
    with pytest.raises(AttributeError, match="head"):
        load_trunk("pml_loop.models.GlyphCNN", strip_classifier="head")
    with pytest.raises(TypeError, match="not an nn.Module"):
        load_trunk("builtins.dict")
    wrong = tmp_path / "wrong.pt"
    torch.save(MLP([3, 3]).state_dict(), wrong)
    with pytest.raises(RuntimeError):
        load_trunk("pml_loop.models.GlyphCNN", weights=wrong)
