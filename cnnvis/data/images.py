"""Reading image files: any PIL mode to RGB (EXIF orientation applied), finding the images a user
names (files, folders, globs), and a check that finds unreadable files up front."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnvis.errors import DataError


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (L, LA, RGBA, P, CMYK, I;16, I, F) to 8-bit RGB.

    Transparent pixels go on white (what a viewer shows); 16-bit and integer images are scaled,
    not clipped, to 8 bits.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        pixels = np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any image file to RGB, turned upright as its EXIF orientation says (what a photo viewer
    shows; a phone photo is stored sideways); a file that is not a readable image is a ``DataError``."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise DataError(f"{path}: {check_image(path) or 'unreadable'}", "Give a PNG, JPEG, BMP, GIF, TIFF or WebP image.") from None


#: what a folder given as ``--image`` contributes: the files PIL reads by these suffixes
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_GLOB_CHARS = ("*", "?", "[")


def find_images(specs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The image files that ``specs`` name, in the given order: a file as it is, a folder as every
    image file inside it (recursively, sorted; found by suffix), a glob (``"photos/*.jpg"``) as its
    sorted matches. Returns ``(paths, notes)``: a note per folder or glob says how many it gave.
    A name that matches nothing is a ``DataError``; duplicates are dropped."""
    found: list[Path] = []
    notes: list[str] = []
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise DataError(f"no image files in {path}", f"Put {', '.join(sorted(IMAGE_SUFFIXES))} files there.")
            notes.append(f"{path}: {len(inside)} image{'s' if len(inside) != 1 else ''}")
            found += inside
        elif path.is_file():
            found.append(path)
        elif any(c in text for c in _GLOB_CHARS):
            root = Path(path.anchor) if path.is_absolute() else Path(".")
            pattern = str(path.relative_to(root)) if path.is_absolute() else text
            matches = sorted(p for p in root.glob(pattern) if p.is_file())
            if not matches:
                raise DataError(f"no files match {text}")
            notes.append(f"{text}: {len(matches)} file{'s' if len(matches) != 1 else ''}")
            found += matches
        else:
            raise DataError(f"image not found: {text}")
    return list(dict.fromkeys(found)), notes


TOO_LARGE = "image too large (decompression bomb limit)"


def check_image(path: str | Path) -> str | None:
    """Decode a file fully; return why it is unusable, or None when it is fine."""
    try:
        with Image.open(path) as image:
            # PIL only warns between 1x and 2x its pixel limit; a bomb is a bomb either way. Counted
            # here, not by turning the warning into an error: warning filters are process-wide and
            # this runs in threads, which restore each other's filters in any order.
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                return TOO_LARGE
            image.load()
            to_rgb(image)
        return None
    except Image.DecompressionBombError:
        return TOO_LARGE
    except UnidentifiedImageError:
        return "not an image" if Path(path).stat().st_size else "empty file"
    except (OSError, SyntaxError, ValueError) as exc:
        # one clause ("unreadable: image file is truncated (26 bytes not processed)"): PIL's own
        # message often ends in parentheses, and callers list files as "path: reason"
        return f"unreadable: {exc}" if str(exc) else "unreadable"


def describe_skipped(skipped: Sequence[tuple[str, str]], limit: int = 20) -> str:
    """``"a.png: not an image; b.jpg: unreadable: ..."``: skipped files with their reasons, for one
    warning line; past ``limit`` files, how many more."""
    shown = "; ".join(f"{path}: {why}" for path, why in skipped[:limit])
    return shown + (f" and {len(skipped) - limit} more" if len(skipped) > limit else "")


def check_images(paths: Sequence[str], workers: int = 4) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode every file once; return (good paths, [(bad path, reason)])."""
    # check_image reports near-bombs itself; PIL's warning about them would only repeat it. Set once
    # here, around all the threads, so that no thread restores another's filters.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        reasons = list(pool.map(check_image, paths))
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    return good, bad
