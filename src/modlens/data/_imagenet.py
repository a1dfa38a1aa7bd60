"""An ImageNet validation folder (``root/<wnid>/<image>.JPEG``) with the standard preprocessing.

Each image is converted to RGB, its shorter side resized to ``resize`` (256, bilinear), centre
cropped to ``size`` x ``size`` (224), scaled to [0, 1] and normalized with the ImageNet mean and
std: the torchvision / PIL evaluation transform ``Resize(256), CenterCrop(224), ToTensor(),
Normalize(mean, std)``, done with Pillow and numpy. Pillow is imported only when images are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from modlens.core.seeds import tagged_sequence

from ._errors import DataCorruptError, DataUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True, eq=False)
class ImageFolderIndex:
    """The images chosen from a class-per-folder tree: ``paths[i]`` has label ``labels[i]``.

    ``classes[k]`` is the folder (wnid) of class index ``k``; classes without a folder still count.
    """

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _pil_image():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"reading ImageNet images needs Pillow ({exc}); install it with: "
                          "pip install pillow") from None
    return Image


def read_class_list(classes: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
    """Class index -> wnid from a list of wnids or a file.

    Files: ``.json`` as Keras' ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``)
    or a JSON list of wnids; anything else is text with one class per line whose first word is the
    wnid (``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``), line ``k`` being class ``k``.
    """
    source = "the class list"
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes).expanduser()
        source = str(path)
        if not path.is_file():
            raise DataUnavailableError(f"class mapping file {path} does not exist; pass a file with one wnid per line, "
                                       "a Keras imagenet_class_index.json, or a list of wnids")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data: Any = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataCorruptError(f"{path} is not valid JSON ({exc})") from None
            if isinstance(data, dict):
                try:
                    order = sorted(data, key=int)
                except ValueError:
                    raise DataCorruptError(f"{path}: keys must be class indices '0', '1', ..., "
                                           f"got {sorted(data)[:3]}") from None
                if [int(k) for k in order] != list(range(len(order))):
                    raise DataCorruptError(f"{path}: class indices must run 0..{len(order) - 1} without gaps")
                data = [data[k][0] if isinstance(data[k], list) and data[k] else data[k] for k in order]
            wnids = data
        else:
            wnids = [line.split()[0] for line in text.splitlines() if line.strip()]
    else:
        wnids = list(classes)
    if not isinstance(wnids, list) or not wnids or not all(isinstance(w, str) and w for w in wnids):
        raise DataCorruptError(f"{source} must give a non-empty list of wnid strings such as 'n01440764'")
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise DataCorruptError(f"{source} lists wnid {dup!r} more than once")
    return tuple(wnids)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def index_image_folder(
    root: str | os.PathLike,
    *,
    per_class: int | None = None,
    seed: int = 0,
    classes: str | os.PathLike | Sequence[str] | None = None,
) -> ImageFolderIndex:
    """List the images of ``root/<wnid>/*.{JPEG,jpg,png}`` with their class indices.

    Class ``k`` is the ``k``-th wnid of ``classes`` (see :func:`read_class_list`) or, without it, of
    the sorted folder names (the standard 1000-class index when all 1000 folders are there; give
    the mapping when only some are). ``per_class`` keeps that many images of each class, drawn
    without replacement from a generator seeded with ``(seed, wnid)``, so a class's subsample does
    not depend on the other folders. Images are ordered by class, then file name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataUnavailableError(f"image folder {root} does not exist; point to a folder laid out as "
                                   "<root>/<class>/<image> (e.g. ImageNet's validation images sorted into wnid folders)")
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer))
                                  or per_class < 1):
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        flat = _images_in(root)
        hint = (f" it holds {len(flat)} images directly: sort them into one sub-folder per class (wnid)"
                if flat else " it is empty")
        raise DataUnavailableError(f"image folder {root} has no class sub-folders;{hint}")
    wnids = read_class_list(classes) if classes is not None else tuple(folders)
    index_of = {w: k for k, w in enumerate(wnids)}
    unknown = [f for f in folders if f not in index_of]
    if unknown:
        raise ValueError(f"folder(s) {unknown[:3]}{' ...' if len(unknown) > 3 else ''} in {root} are not classes of "
                        f"the given mapping ({len(wnids)} classes); remove them or fix the mapping")
    paths: list[Path] = []
    labels: list[int] = []
    for wnid in sorted(folders, key=index_of.__getitem__):
        files = _images_in(root / wnid)
        if not files:
            raise DataUnavailableError(f"class folder {root / wnid} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        if per_class is not None:
            if per_class > len(files):
                raise ValueError(f"class folder {root / wnid} has {len(files)} images, fewer than per_class="
                                f"{per_class}; lower per_class")
            rng = np.random.default_rng(tagged_sequence(int(seed), wnid))  # SeedSequence([seed, crc32(wnid)])
            files = [files[i] for i in np.sort(rng.choice(len(files), size=int(per_class), replace=False))]
        paths += files
        labels += [index_of[wnid]] * len(files)
    return ImageFolderIndex(root, tuple(paths), np.array(labels, dtype=np.int64), wnids)


def check_sizes(size: int | None, resize: int | None) -> None:
    for name, v in (("size", size), ("resize", resize)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if size is not None and resize is not None and resize < size:
        raise ValueError(f"resize ({resize}) must be at least the crop size ({size}); the standard pair is 256 and 224")


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def preprocess_image(
    path: str | os.PathLike, *, size: int | None = 224, resize: int | None = 256, normalize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, channels: int = 3,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """One image as float32 ``(channels, size, size)``: RGB (or grayscale with ``channels=1``),
    shorter side -> ``resize`` (``interpolation``), centre crop ``size``, [0, 1], then
    ``(x - mean) / std`` per channel if ``normalize`` (ImageNet's by default). ``size=None`` keeps
    the image as it is (no resize, no crop); ``resize=None`` resizes the shorter side to ``size``."""
    check_sizes(size, resize)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    Image = _pil_image()
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataCorruptError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); "
                               "delete or replace the file") from None
    if size is not None:
        resize = size if resize is None else resize
        w, h = img.size
        new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), getattr(Image.Resampling, interpolation.upper()))
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32)
    x = (x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) / np.float32(255.0)
    if normalize:
        m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if m.shape not in ((1,), (channels,)) or s.shape != m.shape:
            raise ValueError(f"mean and std need 1 or {channels} values for {channels}-channel images, got "
                             f"{list(map(float, mean))} and {list(map(float, std))}")
        x = (x - m[:, None, None]) / s[:, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def iter_imagenet_folder(
    root: str | os.PathLike,
    *,
    batch_size: int = 64,
    per_class: int | None = None,
    seed: int = 0,
    size: int = 224,
    resize: int = 256,
    classes: str | os.PathLike | Sequence[str] | None = None,
    normalize: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(x float32 (b, 3, size, size), y int64 (b,))`` of an ImageNet validation folder.

    The folder is indexed (and every argument checked) when this is called; images are decoded
    batch by batch, so memory stays at one batch. Arguments as :func:`load_imagenet_folder`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_sizes(size, resize)
    _pil_image()
    index = index_image_folder(root, per_class=per_class, seed=seed, classes=classes)
    return image_batches(index, batch_size=batch_size, size=size, resize=resize, normalize=normalize)


def image_batches(index: ImageFolderIndex, *, batch_size: int, size: int | None, resize: int | None,
                  normalize: bool, **options) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode the images of ``index`` in order, ``batch_size`` at a time (arguments already checked;
    ``options``: ``mean``, ``std``, ``channels``, ``interpolation`` of :func:`preprocess_image`)."""
    for start in range(0, len(index), batch_size):
        chunk = index.paths[start:start + batch_size]
        images = [preprocess_image(p, size=size, resize=resize, normalize=normalize, **options) for p in chunk]
        shapes = sorted({im.shape for im in images})
        if len(shapes) > 1:
            raise ValueError(f"images of {index.root} differ in size ({shapes[0]} and {shapes[-1]}); give an image "
                             "size (--image-size N) to resize and centre-crop them alike")
        yield np.stack(images), index.labels[start:start + len(chunk)].copy()
