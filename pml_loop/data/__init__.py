"""Datasets, splits and transforms for pml-loop's benchmarks.

- :class:`KanjiGlyphs`: ideographs x font faces, shipped with the package.
- :class:`CUB200`, :class:`Cars196`, :class:`StanfordOnlineProducts`: the
  paper's datasets, read from local folders in their standard layouts.
- :func:`split_classes`: the class-disjoint test / fold scheme they share.
- :mod:`transforms`: PIL/torch image transforms (no torchvision).
"""

from .._extras import DATA_MODULES, require_bench_extra

# Fail with the pip command rather than on a bare "No module named 'PIL'".
require_bench_extra("pml_loop.data", DATA_MODULES)

from . import transforms
from .cars196 import Cars196
from .cub import CUB200
from .image_list import DatasetLayoutError, ImageListDataset
from .kanji import KanjiGlyphs, load_glyph_arrays, split_faces
from .sop import StanfordOnlineProducts
from .splits import fixed_split_classes, fold_classes, split_classes

__all__ = [
    "KanjiGlyphs",
    "CUB200",
    "Cars196",
    "StanfordOnlineProducts",
    "ImageListDataset",
    "DatasetLayoutError",
    "split_classes",
    "fixed_split_classes",
    "fold_classes",
    "split_faces",
    "load_glyph_arrays",
    "transforms",
]
