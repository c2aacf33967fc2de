"""The glyph builder, run on tiny fonts built here with fontTools.

Each synthetic glyph is a seeded random pattern of filled cells on a 4x4
grid, so two fonts built with different seeds differ and two with the same
seed are pixel-identical (a near-duplicate face).
"""

from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import pytest

fontBuilder = pytest.importorskip("fontTools.fontBuilder")
from fontTools.pens.ttGlyphPen import TTGlyphPen  # noqa: E402

from pml_loop.data import build_glyphs as bg  # noqa: E402
from pml_loop.data.kanji import KanjiGlyphs  # noqa: E402

UPM = 1000


def _cells_glyph(cells: Iterable[tuple]):
    pen = TTGlyphPen(None)
    step = UPM // 4
    for row, col in cells:
        x0, y0 = col * step + 20, row * step + 20
        x1, y1 = x0 + step - 40, y0 + step - 40
        pen.moveTo((x0, y0))
        pen.lineTo((x0, y1))
        pen.lineTo((x1, y1))
        pen.lineTo((x1, y0))
        pen.closePath()
    return pen.glyph()


def _box_glyph():
    """The classic tofu: a hollow rectangle."""
    pen = TTGlyphPen(None)
    for (x0, y0, x1, y1), clockwise in (((50, 0, 950, 900), True), ((150, 100, 850, 800), False)):
        points = [(x0, y0), (x0, y1), (x1, y1), (x1, y0)]
        if not clockwise:
            points.reverse()
        pen.moveTo(points[0])
        for p in points[1:]:
            pen.lineTo(p)
        pen.closePath()
    return pen.glyph()


def random_cells(seed: int, codepoint: int):
    rng = np.random.default_rng([seed, codepoint])
    mask = rng.random((4, 4)) < 0.5
    mask[rng.integers(4), rng.integers(4)] = True  # never empty
    return [tuple(rc) for rc in np.argwhere(mask)]


def make_font(
    path: Path,
    name: str,
    codepoints: Iterable[int],
    seed: int = 0,
    kind: str = "random",
    overrides: Optional[Dict[int, str]] = None,
) -> Path:
    """Write a TTF mapping ``codepoints``.

    ``kind``: ``"random"`` (seeded cell patterns), ``"empty"`` (no contours:
    a broken font) or ``"tofu"`` (every glyph draws the .notdef box).
    ``overrides`` maps single codepoints to ``"empty"`` / ``"tofu"``.
    """
    codepoints = list(codepoints)
    overrides = overrides or {}
    names = {cp: f"uni{cp:04X}" for cp in codepoints}
    fb = fontBuilder.FontBuilder(UPM, isTTF=True)
    fb.setupGlyphOrder([".notdef"] + list(names.values()))
    fb.setupCharacterMap(dict(names.items()))
    glyphs = {".notdef": _box_glyph()}
    for cp, glyph_name in names.items():
        style = overrides.get(cp, kind)
        if style == "empty":
            glyphs[glyph_name] = TTGlyphPen(None).glyph()
        elif style == "tofu":
            glyphs[glyph_name] = _box_glyph()
        else:
            glyphs[glyph_name] = _cells_glyph(random_cells(seed, cp))
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({g: (UPM, 0) for g in fb.font.getGlyphOrder()})
    fb.setupHorizontalHeader(ascent=900, descent=-100)
    fb.setupNameTable({"familyName": name, "styleName": "Regular", "fullName": name})
    fb.setupOS2(sTypoAscender=900, sTypoDescender=-100, usWinAscent=900, usWinDescent=100)
    fb.setupPost()
    path.parent.mkdir(parents=True, exist_ok=True)
    fb.save(str(path))
    return path

CPS = list(range(0x4E00, 0x4E00 + 12))


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fonts")
    make_font(root / "a" / "alpha.ttf", "Alpha", CPS + [0x4F00], seed=1)
    make_font(root / "b" / "alpha_copy.ttf", "Alpha Copy", CPS, seed=1)  # duplicate design
    make_font(root / "c" / "gamma.otf.ttf", "Gamma", CPS, seed=2,
              overrides={CPS[-1]: "tofu"})  # one tofu glyph: that ideograph goes
    make_font(root / "d" / "delta.ttf", "Delta", CPS, kind="empty")  # broken face
    make_font(root / "e" / "epsilon.ttf", "Epsilon", CPS[:3], seed=3)  # low coverage
    make_font(root / "f" / "phi.ttf", "Phi", CPS, seed=4, overrides={CPS[0]: "empty"})
    (root / "notes.txt").write_text("not a font")
    (root / "broken.ttf").write_bytes(b"garbage")  # unreadable file: skipped
    return root


def test_normalize_glyph_crops_pads_and_resizes():
    ink = np.zeros((40, 60), np.uint8)
    ink[10:20, 5:45] = 255  # a 10 x 40 bar
    out = bg.normalize_glyph(ink, 8)
    assert out.shape == (8, 8)
    # Width fills the square; the bar is vertically centred with empty rows around it.
    assert out[:, 0].max() > 0 and out[:, -1].max() > 0
    assert out[0].max() == 0 and out[-1].max() == 0 and out[4].min() > 200
    assert bg.normalize_glyph(np.zeros((5, 5), np.uint8), 8) is None


def test_select_distinct_faces_drops_near_duplicates():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 8, 8)).astype(np.uint8)
    b = rng.integers(0, 256, (5, 8, 8)).astype(np.uint8)
    noisy_a = np.clip(a.astype(int) + rng.integers(-5, 6, a.shape), 0, 255).astype(np.uint8)
    renders = np.stack([a, b, noisy_a, a])
    assert bg.select_distinct_faces(renders, 0.95) == [0, 1]
    assert bg.select_distinct_faces(renders, 1.01) == [0, 1, 2, 3]
    corr = bg.face_correlations(a, np.stack([a, b]))
    assert corr[0] == pytest.approx(1.0) and abs(corr[1]) < 0.5


def test_quantize_levels():
    x = np.arange(256, dtype=np.uint8)
    q = bg.quantize(x, 16)
    assert len(np.unique(q)) == 16 and q.min() == 0 and q.max() == 255
    assert np.abs(q.astype(int) - x).max() <= 9
    with pytest.raises(ValueError):
        bg.quantize(x, 1)


def test_read_faces_and_common_codepoints(font_dir):
    faces = {}
    for path in bg.find_font_files(font_dir):
        for face, mapped in bg.read_faces(path):
            faces[face.name] = mapped
    assert set(faces) == {"Alpha", "Alpha Copy", "Gamma", "Delta", "Epsilon", "Phi"}
    assert 0x4F00 in faces["Alpha"]
    assert bg.common_codepoints([faces["Alpha"], faces["Epsilon"]]) == CPS[:3]


def test_render_face_flags_empty_and_tofu(font_dir):
    (face, mapped), = bg.read_faces(font_dir / "c" / "gamma.otf.ttf")
    images, ok = bg.render_face(face, CPS, 16, 32, mapped)
    assert images.shape == (len(CPS), 16, 16)
    assert ok[:-1].all() and not ok[-1]  # the last glyph draws the .notdef box
    (face, mapped), = bg.read_faces(font_dir / "d" / "delta.ttf")
    assert not bg.render_face(face, CPS, 16, 32, mapped)[1].any()


def test_build_glyph_set_end_to_end(font_dir, tmp_path):
    glyphs = bg.build_glyph_set(
        font_dir, size=16, render_px=32, min_coverage=10, max_correlation=0.95,
        max_bad_fraction=0.1, num_probe=12, verbose=False,
    )
    # Copy dropped as a duplicate, Delta as broken, Epsilon for coverage.
    assert glyphs["face_names"].tolist() == ["Alpha", "Gamma", "Phi"]
    # Gamma's tofu and Phi's empty glyph remove those two ideographs.
    assert glyphs["codepoints"].tolist() == CPS[1:-1]
    assert glyphs["images"].shape == (3, len(CPS) - 2, 16, 16)
    assert glyphs["images"].dtype == np.uint8 and glyphs["images"].max() == 255
    assert glyphs["font_files"].tolist() == ["a/alpha.ttf", "c/gamma.otf.ttf", "f/phi.ttf"]

    bg.save_glyph_set(tmp_path / "kanji_glyphs.npz", glyphs)
    ds = KanjiGlyphs(root=tmp_path, split="train+val", num_folds=2, size=8)
    assert ds.images.shape[1:] == (1, 8, 8)
    assert set(ds.faces.tolist()) == {0, 1, 2}


def test_build_fails_clearly_without_shared_ideographs(tmp_path):
    make_font(tmp_path / "x.ttf", "X", CPS[:5], seed=1)
    make_font(tmp_path / "y.ttf", "Y", CPS[5:10], seed=2)
    with pytest.raises(ValueError, match="no ideograph is shared"):
        bg.build_glyph_set(tmp_path, size=8, render_px=16, min_coverage=3, verbose=False)
    with pytest.raises(FileNotFoundError, match="font folder"):
        bg.find_font_files(tmp_path / "nope")


def test_cli_writes_npz(font_dir, tmp_path):
    out = tmp_path / "g.npz"
    assert bg.main(["--font_dir", str(font_dir), "--out", str(out), "--size", "8",
                    "--min_coverage", "10", "--max_bad_fraction", "0.1", "--num_probe", "12"]) == 0
    with np.load(out) as npz:
        assert npz["images"].shape[2:] == (8, 8)
        assert npz["images"].shape[0] == 3


def test_exclude_packages_skips_their_fonts(font_dir, monkeypatch):
    monkeypatch.setattr(bg, "debian_package_of", lambda path: "fonts-a" if "/a/" in path else "")
    glyphs = bg.build_glyph_set(
        font_dir, size=8, render_px=16, min_coverage=10, max_bad_fraction=0.1,
        num_probe=12, exclude_packages=["fonts-a"], verbose=False,
    )
    # With Alpha excluded, its copy is no longer a duplicate and is kept.
    assert glyphs["face_names"].tolist() == ["Alpha Copy", "Gamma", "Phi"]
