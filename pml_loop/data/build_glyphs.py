"""Build the kanji-glyph dataset from a folder of fonts.

A class is one CJK unified ideograph, an instance is one font face. The
builder

1. finds every face in ``--font_dir`` (``.ttf``/``.otf``/``.ttc``/``.otc``,
   collections expanded, symlinked duplicates read once),
2. keeps faces that map at least ``--min_coverage`` ideographs and takes the
   ideographs *every* kept face maps,
3. renders a probe subset of them per face and drops broken faces (render
   errors, empty or ``.notdef`` "tofu" glyphs) and near-duplicate faces (pixel
   correlation of the probe renders above ``--max_correlation`` with a face
   already kept: the same design shipped twice, e.g. IPA and Takao),
4. renders the full set for the kept faces, drops faces with too many broken
   glyphs and the ideographs broken in any remaining face,
5. writes a compressed ``.npz`` (see :func:`save_glyph_set`).

Run ``python -m pml_loop.data.build_glyphs --font_dir /usr/share/fonts``.
Needs fontTools (``pip install fonttools``) besides Pillow.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: The CJK Unified Ideographs block (the extensions are covered by few fonts).
CJK_UNIFIED = (0x4E00, 0x9FFF)
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
COLLECTION_SUFFIXES = (".ttc", ".otc")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Face:
    """One face of a font file (a collection holds several)."""

    path: str  # absolute, symlinks resolved
    index: int  # face index inside a collection, 0 otherwise
    name: str  # the font's full name (name ID 4)


# ---------------------------------------------------------------- discovery


def find_font_files(font_dir: os.PathLike) -> List[Path]:
    """Every font file under ``font_dir`` (recursive), symlinks resolved,
    each real file once, sorted for a deterministic face order."""
    root = Path(font_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"font folder not found: {root}")
    found = {
        p.resolve()
        for p in root.rglob("*")
        if p.suffix.lower() in FONT_SUFFIXES and p.resolve().is_file()
    }
    return sorted(found)


def _open_faces(path: Path):
    """fontTools objects for each face of ``path`` (lazy: tables load on use)."""
    from fontTools.ttLib import TTCollection, TTFont

    if path.suffix.lower() in COLLECTION_SUFFIXES:
        return list(TTCollection(str(path), lazy=True).fonts)
    return [TTFont(str(path), lazy=True)]


def read_faces(path: os.PathLike) -> List[Tuple[Face, Set[int]]]:
    """The faces of one font file, each with the ideographs its cmap maps.

    Ideographs mapped to the ``.notdef`` glyph count as missing. A file that
    fontTools cannot parse gives an empty list (it is reported, not fatal).
    """
    path = Path(path)
    try:
        fonts = _open_faces(path)
    except Exception as err:  # a broken file must not stop the build
        print(f"skipping unreadable font {path}: {err}", file=sys.stderr)
        return []
    faces = []
    for index, font in enumerate(fonts):
        try:
            cmap = font.getBestCmap() or {}
            notdef = font.getGlyphOrder()[0]
            name = font["name"].getDebugName(4) or f"{path.stem}[{index}]"
        except Exception as err:
            print(f"skipping face {path}[{index}]: {err}", file=sys.stderr)
            continue
        lo, hi = CJK_UNIFIED
        mapped = {c for c, g in cmap.items() if lo <= c <= hi and g != notdef}
        faces.append((Face(str(path), index, name), mapped))
    return faces


# ---------------------------------------------------------------- rendering


def normalize_glyph(ink: np.ndarray, size: int) -> Optional[np.ndarray]:
    """Crop to the ink box, pad to a centred square, resize to ``size``.

    Args:
        ink: uint8 ``[H, W]``, 0 = background, 255 = full ink.
    Returns:
        uint8 ``[size, size]``, or ``None`` when there is no ink at all.
    """
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0:
        return None
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = box.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = box
    # BOX = area average, the same filter the dataset uses to downsample.
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BOX))


def render_char(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """The ink of one character, uint8 ``[H, W]`` (ink = 255), unnormalised."""
    left, top, right, bottom = font.getbbox(char)
    width, height = max(right - left, 1) + 4, max(bottom - top, 1) + 4
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), char, font=font, fill=255)
    return np.asarray(canvas)


def _missing_char(codepoints: Set[int]) -> str:
    """A character the face does not map, so rendering it shows ``.notdef``."""
    for cp in (0x10FFFD, 0xFFFF, 0xE000, 0xE001):
        if cp not in codepoints:
            return chr(cp)
    raise ValueError("face maps every probe codepoint; cannot find .notdef")


def render_face(
    face: Face,
    codepoints: Sequence[int],
    size: int,
    render_px: int,
    mapped: Optional[Set[int]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Render ``codepoints`` in ``face``.

    A glyph is *bad* when rendering raises, draws no ink, or draws exactly
    what the ``.notdef`` glyph draws (tofu).

    Returns:
        ``(images, ok)``: uint8 ``[C, size, size]`` (zeros where bad) and a
        bool ``[C]`` mask of good glyphs.
    """
    images = np.zeros((len(codepoints), size, size), dtype=np.uint8)
    ok = np.zeros(len(codepoints), dtype=bool)
    try:
        font = ImageFont.truetype(
            face.path, size=render_px, index=face.index,
            layout_engine=ImageFont.Layout.BASIC,
        )
        notdef = normalize_glyph(
            render_char(font, _missing_char(mapped or set(codepoints))), size
        )
    except Exception as err:
        print(f"cannot load face {face.name} ({face.path}): {err}", file=sys.stderr)
        return images, ok
    for i, cp in enumerate(codepoints):
        try:
            glyph = normalize_glyph(render_char(font, chr(cp)), size)
        except Exception:
            continue
        if glyph is None or (notdef is not None and np.array_equal(glyph, notdef)):
            continue
        images[i], ok[i] = glyph, True
    return images, ok


# ---------------------------------------------------------------- selection


def face_correlations(candidate: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Pixel correlation of one face's renders with each kept face's.

    Args:
        candidate: ``[C, H, W]`` renders of the candidate face.
        kept: ``[K, C, H, W]`` renders of the faces kept so far.
    Returns:
        float ``[K]``: Pearson correlation over all ``C*H*W`` pixels.
    """
    def standardized(x: np.ndarray) -> np.ndarray:
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norm, 1e-12)

    if len(kept) == 0:
        return np.zeros(0)
    return standardized(kept) @ standardized(candidate[None])[0]


def select_distinct_faces(renders: np.ndarray, max_correlation: float) -> List[int]:
    """Greedy dedupe: walk the faces in order, keep a face unless its renders
    correlate above ``max_correlation`` with a face already kept.

    Args:
        renders: ``[F, C, H, W]``, the same codepoints in every face.
    Returns:
        indices of the kept faces, increasing.
    """
    kept: List[int] = []
    for f in range(len(renders)):
        corr = face_correlations(renders[f], renders[kept])
        if len(corr) == 0 or corr.max() <= max_correlation:
            kept.append(f)
    return kept


def quantize(images: np.ndarray, levels: int) -> np.ndarray:
    """Round uint8 grey values to ``levels`` evenly spaced values in 0..255.

    16 levels are indistinguishable for antialiased strokes and make the
    compressed file about 40% smaller; the result is still plain uint8.
    """
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256], got {levels}")
    step = 255.0 / (levels - 1)
    return (np.round(images / step) * step).round().astype(np.uint8)


def common_codepoints(coverages: Iterable[Set[int]]) -> List[int]:
    """The codepoints every face maps, sorted."""
    coverages = list(coverages)
    if not coverages:
        return []
    return sorted(set.intersection(*coverages))


def probe_subset(codepoints: Sequence[int], num: int, seed: int = 0) -> List[int]:
    """A deterministic sample of ``num`` codepoints (all if fewer), sorted."""
    if len(codepoints) <= num:
        return list(codepoints)
    rng = np.random.default_rng(seed)
    return sorted(np.asarray(codepoints)[rng.choice(len(codepoints), num, replace=False)].tolist())


# ---------------------------------------------------------------- provenance


def debian_package_of(path: str) -> str:
    """The Debian package that installed ``path``, or ``""`` (no dpkg, or a
    file no package owns)."""
    try:
        out = subprocess.run(
            ["dpkg", "-S", path], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return ""
    first = out.strip().splitlines()[0] if out.strip() else ""
    return first.split(":")[0].strip() if ":" in first else ""


def debian_licence_of(package: str, font_file: str = "") -> str:
    """The licence of a package's upstream files, read from its
    ``/usr/share/doc/<package>/copyright``.

    For machine-readable (DEP-5) files: the ``License:`` of the first
    ``Files:`` stanza that matches the font's file name, else the first one
    not about ``debian/*``. For free-form files, a known licence name found
    in the text; otherwise ``"see /usr/share/doc/<package>/copyright"``.
    """
    if not package:
        return ""
    copyright_path = Path("/usr/share/doc") / package / "copyright"
    if not copyright_path.is_file():
        return ""
    text = copyright_path.read_text(errors="replace")
    stanzas = re.findall(r"^Files:\s*(.+?)\n(?:.*\n)*?License:\s*(.+)$", text, re.M)
    base = os.path.basename(font_file)
    upstream = [(f, lic.strip()) for f, lic in stanzas if not f.strip().startswith("debian/")]
    for files, lic in upstream:
        if base and any(fnmatch.fnmatch(base, os.path.basename(p)) for p in files.split()):
            return lic
    if upstream:
        return upstream[0][1]
    for known in ("Arphic Public License", "SIL Open Font License", "IPA Font License",
                  "GNU General Public License", "BSD"):
        if known.lower() in text.lower():
            return known
    return f"see {copyright_path}"


# ---------------------------------------------------------------- pipeline


def build_glyph_set(
    font_dir: os.PathLike,
    size: int = 32,
    render_px: int = 64,
    min_coverage: int = 2000,
    max_correlation: float = 0.9,
    max_bad_fraction: float = 0.01,
    num_probe: int = 200,
    max_classes: Optional[int] = None,
    levels: int = 16,
    exclude_packages: Sequence[str] = (),
    seed: int = 0,
    verbose: bool = True,
) -> Dict[str, np.ndarray]:
    """Run the whole pipeline (see the module docstring).

    Args:
        size: side of the stored glyphs.
        render_px: font size in pixels at which glyphs are drawn before the
            crop/resize (about 2x ``size`` keeps strokes antialiased).
        min_coverage: faces mapping fewer ideographs are dropped before the
            intersection (they would shrink it to nothing).
        max_correlation: near-duplicate threshold of :func:`select_distinct_faces`.
        max_bad_fraction: a face with more broken glyphs (of the common set)
            than this is dropped rather than costing the set those ideographs.
        num_probe: ideographs rendered per face for the broken/duplicate check.
        max_classes: keep at most this many ideographs (a seeded sample).
        levels: grey levels kept (:func:`quantize`); 256 keeps them all.
        exclude_packages: Debian packages whose faces are skipped (e.g. to
            leave out a licence you do not want in the shipped file).
    Returns:
        the arrays :func:`save_glyph_set` writes.
    """
    log = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    faces, coverage = [], []
    for path in find_font_files(font_dir):
        if exclude_packages and debian_package_of(str(path)) in set(exclude_packages):
            log(f"skip {path}: package excluded")
            continue
        for face, mapped in read_faces(path):
            faces.append(face)
            coverage.append(mapped)
    log(f"{len(faces)} faces found in {font_dir}")
    wide = [i for i, c in enumerate(coverage) if len(c) >= min_coverage]
    log(f"{len(wide)} faces map >= {min_coverage} ideographs")
    common = common_codepoints(coverage[i] for i in wide)
    log(f"{len(common)} ideographs mapped by all of them")
    if not common:
        raise ValueError(
            f"no ideograph is shared by the {len(wide)} faces in {font_dir} "
            f"that map >= {min_coverage} ideographs"
        )

    # Cheap pass on a probe subset: broken faces, then near duplicates.
    probe = probe_subset(common, num_probe, seed)
    renders, usable = [], []
    for i in wide:
        images, ok = render_face(faces[i], probe, size, render_px, coverage[i])
        if (~ok).mean() > max_bad_fraction:
            log(f"drop broken face {faces[i].name}: {(~ok).sum()}/{len(probe)} bad probe glyphs")
            continue
        renders.append(images)
        usable.append(i)
    distinct = [usable[k] for k in select_distinct_faces(np.stack(renders), max_correlation)]
    log(f"{len(distinct)} distinct faces of {len(usable)} usable")

    # Full pass on the kept faces.
    full, oks, kept = [], [], []
    for i in distinct:
        images, ok = render_face(faces[i], common, size, render_px, coverage[i])
        if (~ok).mean() > max_bad_fraction:
            log(f"drop face {faces[i].name}: {(~ok).sum()}/{len(common)} bad glyphs")
            continue
        full.append(images)
        oks.append(ok)
        kept.append(i)
    images = np.stack(full)
    good = np.stack(oks).all(axis=0)
    codepoints = np.asarray(common)[good]
    images = images[:, good]
    if max_classes is not None and len(codepoints) > max_classes:
        pick = np.sort(np.random.default_rng(seed).choice(len(codepoints), max_classes, replace=False))
        codepoints, images = codepoints[pick], images[:, pick]
    log(f"kept {len(kept)} faces x {len(codepoints)} ideographs")

    font_root = Path(font_dir).resolve()
    packages = [debian_package_of(faces[i].path) for i in kept]
    return {
        "images": quantize(images, levels),
        "codepoints": codepoints.astype(np.int32),
        "face_names": np.asarray([faces[i].name for i in kept]),
        "font_files": np.asarray([_relative_or_absolute(faces[i].path, font_root) for i in kept]),
        "face_indices": np.asarray([faces[i].index for i in kept], dtype=np.int32),
        "packages": np.asarray(packages),
        "licences": np.asarray([debian_licence_of(p, faces[i].path) for p, i in zip(packages, kept)]),
        "format_version": np.asarray(FORMAT_VERSION),
    }


def _relative_or_absolute(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:  # a symlink led outside the folder
        return path


def save_glyph_set(path: os.PathLike, glyph_set: Dict[str, np.ndarray]) -> None:
    """Write the arrays with ``np.savez_compressed``.

    Keys: ``images`` uint8 ``[F, C, S, S]`` (ink = 255), ``codepoints`` int32
    ``[C]``, and per face ``face_names``, ``font_files``, ``face_indices``,
    ``packages``, ``licences`` (unicode arrays, loadable without pickle).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **glyph_set)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--font_dir", required=True, help="folder searched recursively for fonts")
    parser.add_argument("--out", default="kanji_glyphs.npz")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--render_px", type=int, default=None, help="default: 2 x size")
    parser.add_argument("--min_coverage", type=int, default=2000)
    parser.add_argument("--max_correlation", type=float, default=0.9,
                        help="faces correlating above this with a kept face are dropped")
    parser.add_argument("--max_bad_fraction", type=float, default=0.01)
    parser.add_argument("--num_probe", type=int, default=200)
    parser.add_argument("--max_classes", type=int, default=None)
    parser.add_argument("--levels", type=int, default=16, help="grey levels kept")
    parser.add_argument("--exclude_packages", nargs="*", default=[],
                        help="Debian packages whose fonts are skipped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    glyph_set = build_glyph_set(
        args.font_dir, size=args.size, render_px=args.render_px or 2 * args.size,
        min_coverage=args.min_coverage, max_correlation=args.max_correlation,
        max_bad_fraction=args.max_bad_fraction, num_probe=args.num_probe,
        max_classes=args.max_classes, levels=args.levels,
        exclude_packages=args.exclude_packages, seed=args.seed,
    )
    save_glyph_set(args.out, glyph_set)
    print(f"wrote {args.out}: {glyph_set['images'].shape} "
          f"({os.path.getsize(args.out) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
