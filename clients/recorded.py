"""Recorded eye-tracking sessions on disk: the dataset folder format and its reader.

A dataset is a folder (``docs/dataset-format.md`` is the full description)::

    DATASET_DIR/
    ├── stimuli/          the images (file names are the image ids; sub-folders allowed)
    ├── fixations.csv     one row per fixation (image, subject, fix_index, x_px, y_px,
    │                     duration_ms; other columns ignored)
    └── dataset.json      optional: {"name": ..., "px_per_deg": ... or null, any extra keys}

``RecordedDataset`` turns it into what a live eye tracker would send: one participant's
*session* (every image in a fixed order, each image's scanpath in order, ``reset`` at the first
fixation of a new image), or many sessions *interleaved* tick by tick, one stream per subject.
It imports numpy, OpenCV and the standard library only, so it runs next to an eye tracker
without PyTorch. Reading and checking the files themselves (``fixations.csv``, ``dataset.json``,
``stimuli/``) is ``clients/dataset_files.py``; ``DatasetError``, ``Fixation`` and ``REQUIRED_COLUMNS``
are re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from clients.dataset_files import (
    REQUIRED_COLUMNS,
    DatasetError,
    Fixation,
    check_px_per_deg,
    list_stimuli,
    read_fixations,
    read_metadata,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "DatasetError",
    "Fixation",
    "RecordedDataset",
    "bundled_dataset_path",
    "default_dataset_path",
]

log = logging.getLogger(__name__)

_IMAGE_CACHE_SIZE = 8

_REPO_ROOT = Path(__file__).resolve().parent.parent


def bundled_dataset_path() -> Path:
    """The small OSIE subset committed with the repository (``data/osie-mini``)."""
    return _REPO_ROOT / "data" / "osie-mini"


def default_dataset_path() -> Path:
    """The dataset to use when none is named.

    ``$FOVEATE_DATASET`` if set, else the full OSIE copy at ``../shared/data/osie`` next to the
    repository if it exists, else the bundled subset.
    """
    env = os.environ.get("FOVEATE_DATASET")
    if env:
        return Path(env).expanduser()
    shared = _REPO_ROOT.parent / "shared" / "data" / "osie"
    if shared.is_dir():
        return shared
    return bundled_dataset_path()


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key ordering digit runs by value: ``"2"`` before ``"10"``, ``"s2"`` before ``"s10"``."""
    # re.split with a capturing group alternates text, number, text, ... so the pieces at each
    # position always have the same type and compare without TypeError.
    parts = re.split(r"(\d+)", text)
    key = tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))
    return key, text


class RecordedDataset:
    """Fixations recorded on a set of images, read from a dataset folder.

    Use :meth:`open`; the constructor takes already-validated parts.

    Examples
    --------
    >>> from clients.recorded import RecordedDataset, bundled_dataset_path
    >>> ds = RecordedDataset.open(bundled_dataset_path())
    >>> ds.images[:2], ds.subjects[:3]
    (['1001.jpg', '1002.jpg'], ['1', '2', '3'])
    >>> fix, reset = next(ds.session("1"))
    >>> (fix.image, fix.fix_index, reset)
    ('1001.jpg', 0, True)
    """

    def __init__(
        self,
        root: Path,
        name: str,
        px_per_deg: float | None,
        images: list[str],
        scanpaths: dict[tuple[str, str], list[Fixation]],
        metadata: dict[str, Any],
    ) -> None:
        self.root = root
        self._name = name
        self._px_per_deg = px_per_deg
        self._images = images
        self._image_set = frozenset(images)
        self._scanpaths = scanpaths
        self._subjects = sorted({s for _, s in scanpaths}, key=natural_key)
        self._subject_set = frozenset(self._subjects)
        self.metadata = metadata
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    # ---------------------------------------------------------------- reading

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, px_per_deg: float | None = None) -> RecordedDataset:
        """Read and validate a dataset folder.

        Parameters
        ----------
        path : str or PathLike
            The dataset folder (``stimuli/``, ``fixations.csv``, optional ``dataset.json``).
        px_per_deg : float, optional
            Screen scale in pixels per degree of visual angle; overrides ``dataset.json``.

        Raises
        ------
        DatasetError
            The folder, ``stimuli/`` or ``fixations.csv`` is missing; a required column is
            missing; a value is not a finite number; a row names an image that is not in
            ``stimuli/``; a fixation index repeats; or ``dataset.json`` is malformed.
        """
        if px_per_deg is not None:
            px_per_deg = check_px_per_deg(px_per_deg, "the px_per_deg argument")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist (or is not a folder)")
        metadata = read_metadata(root)
        images = list_stimuli(root)
        scanpaths = read_fixations(root / "fixations.csv", frozenset(images))
        if not scanpaths:
            raise DatasetError(f"{root / 'fixations.csv'} has a header but no fixation rows")
        if px_per_deg is None:
            px_per_deg = metadata.get("px_per_deg")
        name = metadata.get("name") or root.resolve().name
        ds = cls(root, name, px_per_deg, images, scanpaths, metadata)
        log.info(
            "opened dataset %s at %s: %d images, %d subjects, %d fixations",
            ds.name,
            root,
            len(ds.images),
            len(ds.subjects),
            ds.n_fixations,
        )
        return ds

    @property
    def name(self) -> str:
        """Dataset name: ``dataset.json``'s ``name``, else the folder name."""
        return self._name

    @property
    def px_per_deg(self) -> float | None:
        """Pixels per degree of visual angle, or None where the screen geometry is unknown."""
        return self._px_per_deg

    @property
    def images(self) -> list[str]:
        """Image ids (paths relative to ``stimuli/``), sorted by file name: the session order."""
        return list(self._images)

    @property
    def subjects(self) -> list[str]:
        """Subject ids in natural order (``"2"`` before ``"10"``)."""
        return list(self._subjects)

    @property
    def n_fixations(self) -> int:
        """Number of fixations (rows of ``fixations.csv``)."""
        return sum(len(p) for p in self._scanpaths.values())

    def load_image(self, name: str) -> np.ndarray:
        """Load a stimulus as an RGB uint8 array of shape (H, W, 3).

        The few most recently used images are cached; the returned array is read-only, so copy
        it before changing it.
        """
        self._check_image(name)
        with self._cache_lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        path = self.root / "stimuli" / name
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"{path}: OpenCV cannot decode this image; replace or remove it")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR; foveate works in RGB
        rgb.flags.writeable = False
        with self._cache_lock:
            self._cache[name] = rgb
            while len(self._cache) > _IMAGE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return rgb

    def scanpath(self, image: str, subject: str | int) -> list[Fixation]:
        """One subject's fixations on one image, ordered by ``fix_index`` (empty if none)."""
        self._check_image(image)
        subject = self._check_subject(subject)
        return list(self._scanpaths.get((image, subject), ()))

    # ---------------------------------------------------------------- sessions

    def session(
        self, subject: str | int, images: int | Sequence[str] | None = None
    ) -> Iterator[tuple[Fixation, bool]]:
        """One participant's session as an eye tracker would stream it.

        Parameters
        ----------
        subject : str or int
            The subject id.
        images : int or sequence of str, optional
            All images in :attr:`images` order (None), the first N of them (int), or these
            images in this order (sequence).

        Yields
        ------
        (Fixation, bool)
            Each fixation, and ``reset``: True at the first fixation of every image. Images the
            subject has no fixations on are skipped.
        """
        subject = self._check_subject(subject)
        for image in self._select_images(images):
            for i, fix in enumerate(self._scanpaths.get((image, subject), ())):
                yield fix, i == 0

    def interleaved(
        self,
        subjects: Sequence[str | int] | None = None,
        images: int | Sequence[str] | None = None,
    ) -> Iterator[list[tuple[str, Fixation, bool]]]:
        """Many subjects' sessions at once, one tick at a time, one stream per subject.

        Each tick holds the next fixation of every session that has not ended, in subject order,
        as ``(stream_id, fixation, reset)`` with ``stream_id = f"subject-{subject}"``; so a
        stream appears at most once per tick and each stream keeps its own order. Sessions that
        end drop out; iteration stops when all have ended.

        Parameters
        ----------
        subjects : sequence, optional
            Subject ids in the order to use within a tick; default all, in natural order.
        images : int or sequence of str, optional
            As in :meth:`session`.
        """
        chosen = self._subjects if subjects is None else [self._check_subject(s) for s in subjects]
        if len(set(chosen)) != len(chosen):
            raise DatasetError(f"subjects {chosen} repeat an id; each stream must be unique")
        image_list = self._select_images(images)
        live = [(f"subject-{s}", self.session(s, image_list)) for s in chosen]
        while live:
            tick: list[tuple[str, Fixation, bool]] = []
            still: list[tuple[str, Iterator[tuple[Fixation, bool]]]] = []
            for stream_id, it in live:
                nxt = next(it, None)
                if nxt is not None:
                    tick.append((stream_id, nxt[0], nxt[1]))
                    still.append((stream_id, it))
            live = still
            if tick:
                yield tick

    # ---------------------------------------------------------------- checks

    def _check_image(self, image: str) -> None:
        # Only listed images may be opened, so a name can never reach outside stimuli/.
        if image not in self._image_set:
            raise DatasetError(f"image {image!r} is not in {self.root / 'stimuli'}")

    def _check_subject(self, subject: str | int) -> str:
        sid = str(subject)
        if sid not in self._subject_set:
            raise DatasetError(
                f"subject {sid!r} has no fixations in {self.root / 'fixations.csv'}; "
                f"known subjects: {', '.join(self._subjects[:20])}"
            )
        return sid

    def _select_images(self, images: int | Sequence[str] | None) -> list[str]:
        if images is None:
            return list(self._images)
        if isinstance(images, bool):
            raise DatasetError(f"images={images}: pass None, a number of images or a list of names")
        if isinstance(images, (int, np.integer)):
            if images < 0:
                raise DatasetError(f"images={images}: the number of images must be >= 0")
            return self._images[: int(images)]
        if isinstance(images, str):
            raise DatasetError(f"images={images!r}: pass a list of image names, not one string")
        chosen = list(images)
        for image in chosen:
            self._check_image(image)
        return chosen

    def __repr__(self) -> str:
        return (
            f"RecordedDataset(name={self.name!r}, images={len(self._images)}, "
            f"subjects={len(self._subjects)}, fixations={self.n_fixations}, "
            f"px_per_deg={self.px_per_deg})"
        )
