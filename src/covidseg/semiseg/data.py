"""Loader of the COVID-SemiSeg layout (Fan et al., "Inf-Net", IEEE TMI 39(8), 2020; docs/method.md).

A folder of that layout holds::

    Imgs/N.jpg              8-bit greyscale axial CT slice, windowed and cropped around the lungs (no HU, no mm)
    GT/N.png                binary infection mask, 0 or 255 (binarised here at > 128, as Inf-Net's evaluation)
    GT-multiclass/N.png     optional: 0 background, 1 ground-glass opacity, 2 consolidation

Slices are paired by file stem (``Imgs/7.jpg`` with ``GT/7.png``); any suffix PIL reads is accepted. Unpaired or
unreadable files raise :class:`~covidseg.errors.InputError` naming the file. Slices are kept at their own size
(about 150-460 px a side); :func:`resize_stack` builds the fixed-size training tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.errors import InputError

IMAGES_DIR = "Imgs"
"""Sub-folder of the CT slices."""
MASKS_DIR = "GT"
"""Sub-folder of the binary infection masks."""
MULTICLASS_DIR = "GT-multiclass"
"""Optional sub-folder of the ground-glass / consolidation masks."""
GT_THRESHOLD = 128
"""A GT pixel is infection when its value is > 128 (Inf-Net's ``EvaluationTool/main.m``)."""
INTENSITY_MAX = 255.0
"""8-bit slices are scaled by this onto [0, 1]."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""File suffixes taken as images (case-insensitive); other files (``.DS_Store``, ``Thumbs.db``) are ignored."""


@dataclass
class Slice:
    """One labelled slice at its own size.

    Attributes:
        name: the file stem (``"7"``).
        image: ``(H, W)`` float32 in [0, 1] (8-bit value / 255).
        mask: ``(H, W)`` uint8 in {0, 1} (GT > 128).
        multiclass: ``(H, W)`` uint8 (0 background, 1 ground-glass, 2 consolidation) or ``None``.
        image_path: the slice file.
        mask_path: the GT file.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    multiclass: np.ndarray | None
    image_path: Path
    mask_path: Path

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))


def _natural_key(stem: str) -> tuple[int, int | str]:
    """Numeric stems sort as numbers (2 before 10), others after them alphabetically."""
    return (0, int(stem)) if re.fullmatch(r"\d+", stem) else (1, stem)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in out:
            raise InputError(
                f"{path}: two files share the stem {path.stem!r} ({out[path.stem].name} and {path.name}); "
                "keep one file per slice"
            )
        out[path.stem] = path
    return out


def _read_grey(path: Path) -> np.ndarray:
    """An image file as a 2D uint8 array (RGB is converted to grey, as Inf-Net's ``rgb2gray``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode == "P":  # palette PNG (GT-multiclass): keep the indices, they are the labels
                return np.asarray(im, dtype=np.uint8).copy()
            grey = im if im.mode == "L" else im.convert("L")  # mode "1" becomes 0/255 too
            return np.asarray(grey, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({exc}); replace or remove the file") from None


def list_pairs(root: Path | str) -> list[tuple[str, Path, Path, Path | None]]:
    """The ``(stem, image, mask, multiclass or None)`` files of a COVID-SemiSeg folder, in natural order.

    Raises:
        InputError: missing folder or sub-folder, no slices, or a slice without its mask (or the reverse).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found; give a folder holding {IMAGES_DIR}/ and {MASKS_DIR}/")
    img_dir, gt_dir, mc_dir = root / IMAGES_DIR, root / MASKS_DIR, root / MULTICLASS_DIR
    for sub in (img_dir, gt_dir):
        if not sub.is_dir():
            raise InputError(
                f"{root}: no {sub.name}/ sub-folder; expected the COVID-SemiSeg layout "
                f"{IMAGES_DIR}/N.jpg + {MASKS_DIR}/N.png (e.g. .../covid-semiseg/train)"
            )
    images, masks = _files_by_stem(img_dir), _files_by_stem(gt_dir)
    multi = _files_by_stem(mc_dir) if mc_dir.is_dir() else {}
    if not images:
        raise InputError(f"{img_dir}: no image files ({', '.join(IMAGE_SUFFIXES)}); put the slices there")
    for stem in sorted(set(images) - set(masks), key=_natural_key):
        raise InputError(f"{images[stem]}: no matching mask {gt_dir}/{stem}.png; add it or remove the slice")
    for stem in sorted(set(masks) - set(images), key=_natural_key):
        raise InputError(f"{masks[stem]}: no matching slice {img_dir}/{stem}.jpg; add it or remove the mask")
    if multi:
        for stem in sorted(set(multi) ^ set(images), key=_natural_key):
            where = multi.get(stem) or images[stem]
            raise InputError(
                f"{where}: {MULTICLASS_DIR}/ and {IMAGES_DIR}/ do not hold the same slices (stem {stem!r}); "
                f"complete {MULTICLASS_DIR}/ or remove it"
            )
    return [(s, images[s], masks[s], multi.get(s)) for s in sorted(images, key=_natural_key)]


def load_folder(root: Path | str) -> list[Slice]:
    """Read every slice of a COVID-SemiSeg folder (``Imgs/``, ``GT/``, optional ``GT-multiclass/``).

    Args:
        root: e.g. ``../shared/data/covid-semiseg/train``.

    Returns:
        The slices in natural stem order (``0, 1, 2, ..., 10``).

    Raises:
        InputError: see :func:`list_pairs`; unreadable files; a mask whose size differs from its slice.
    """
    out = []
    for stem, img_path, gt_path, mc_path in list_pairs(root):
        image = _read_grey(img_path)
        gt = _read_grey(gt_path)
        if gt.shape != image.shape:
            raise InputError(
                f"{gt_path}: mask size {gt.shape[1]}x{gt.shape[0]} differs from its slice {img_path.name} "
                f"({image.shape[1]}x{image.shape[0]}); masks must have their slice's size"
            )
        multiclass = None
        if mc_path is not None:
            multiclass = _read_grey(mc_path)
            if multiclass.shape != image.shape:
                raise InputError(
                    f"{mc_path}: size {multiclass.shape[1]}x{multiclass.shape[0]} differs from its slice "
                    f"{img_path.name} ({image.shape[1]}x{image.shape[0]})"
                )
        out.append(Slice(
            name=stem,
            image=image.astype(np.float32) / INTENSITY_MAX,
            mask=(gt > GT_THRESHOLD).astype(np.uint8),
            multiclass=multiclass,
            image_path=img_path,
            mask_path=gt_path,
        ))
    return out


PSEUDO_NAME = re.compile(r"Data-1_(?P<case>.+)_(?P<k>\d+)")
"""Stem of a slice of Inf-Net's pseudo-labelled set: ``Data-1_<case>_<k>`` (``<case>`` the Zenodo volume's stem,
``k`` = 1..n within the case)."""


def pseudo_case(name: str) -> tuple[str, int]:
    """``(case, k)`` of a pseudo-labelled slice's stem, e.g. ``("coronacases_org_001", 7)``.

    Raises:
        InputError: the stem is not of the form ``Data-1_<case>_<k>``.
    """
    m = PSEUDO_NAME.fullmatch(name)
    if m is None:
        raise InputError(f"{name!r}: not a slice name of the pseudo-labelled layout (Data-1_<case>_<k>)")
    return m["case"], int(m["k"])


def load_pseudo_folder(root: Path | str) -> list[Slice]:
    """Read Inf-Net's pseudo-labelled slices: ``Imgs/Data-1_<case>_<k>.jpg`` + ``GT/Data-1_<case>_<k>.png``.

    The masks are machine-made (Semi-Inf-Net's predictions): training material, never a reference for a score.

    Args:
        root: e.g. ``../shared/data/covid-semiseg/pseudo``.

    Returns:
        The slices sorted by case, then by ``k`` (numerically).

    Raises:
        InputError: as :func:`load_folder`; a file whose stem is not ``Data-1_<case>_<k>`` (naming it).
    """
    slices = load_folder(root)
    for s in slices:
        if PSEUDO_NAME.fullmatch(s.name) is None:
            raise InputError(f"{s.image_path}: not named Data-1_<case>_<k>; {root} is not the pseudo-labelled "
                             "layout (for Imgs/N.jpg folders use the labelled loader)")
    return sorted(slices, key=lambda s: pseudo_case(s.name))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one ``(H, W)`` slice to ``size`` -> ``(1, h, w)`` float32 tensor.

    ``align_corners=False`` as torchvision's ``Resize`` that Inf-Net used (its ``trainsize`` 352).
    """
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]  # (1, 1, H, W)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]  # (1, h, w)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``(H, W)`` {0, 1} mask to ``size`` -> ``(1, h, w)`` float32 in {0, 1}.

    Bilinear interpolation then ``>= 0.5``: the mask keeps its area better than nearest neighbour does.
    """
    return (resize_image(mask.astype(np.float32), size) >= 0.5).float()


def resize_stack(slices: list[Slice], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All slices at one training size.

    Args:
        slices: from :func:`load_folder`.
        size: ``(h, w)`` in pixels (e.g. ``(352, 352)``); each a multiple of the model's ``size_divisor``.

    Returns:
        ``images`` ``(N, 1, h, w)`` float32 in [0, 1] and ``masks`` ``(N, 1, h, w)`` float32 in {0, 1}.
    """
    if not slices:
        raise InputError("no slices to stack; the folder is empty")
    images = torch.stack([resize_image(s.image, size) for s in slices])  # (N, 1, h, w)
    masks = torch.stack([resize_mask(s.mask, size) for s in slices])  # (N, 1, h, w)
    return images, masks
