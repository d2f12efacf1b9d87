"""Regenerate ``data/osie-mini/``, the small OSIE subset bundled with foveate.

The subset is the first ``--images`` stimuli by file name (1001.jpg, 1002.jpg, ...) with every
subject's fixations on them, rows copied unchanged (same columns, same order) from the full
``fixations.csv``. The JPEG files and ``LICENSE`` are copied byte for byte.

Usage (from the repository root)::

    python scripts/make_osie_mini.py ../shared/data/osie data/osie-mini --images 40

``README.md`` and ``dataset.json`` in the output folder are written by hand and left untouched.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path


def make_subset(source: Path, dest: Path, n_images: int) -> tuple[int, int, int]:
    """Copy the first ``n_images`` stimuli of ``source`` and their fixations into ``dest``.

    Parameters
    ----------
    source : Path
        A full OSIE folder with ``stimuli/``, ``fixations.csv`` and ``LICENSE``.
    dest : Path
        The output folder; created if missing. Existing stimuli there are removed first so a
        smaller ``n_images`` leaves no stale files behind.
    n_images : int
        How many images to keep, taken in file-name order.

    Returns
    -------
    tuple of int
        (images, subjects, fixations) written.
    """
    names = sorted(p.name for p in (source / "stimuli").iterdir() if p.is_file())[:n_images]
    keep = set(names)
    stim_out = dest / "stimuli"
    if stim_out.exists():
        shutil.rmtree(stim_out)
    stim_out.mkdir(parents=True)
    for name in names:
        shutil.copyfile(source / "stimuli" / name, stim_out / name)
    shutil.copyfile(source / "LICENSE", dest / "LICENSE")

    # Rows are copied as raw lines (line endings included, the full file uses CRLF) so the subset
    # is byte-identical to the matching lines of the full file.
    subjects: set[str] = set()
    n_rows = 0
    with (
        open(source / "fixations.csv", newline="") as fin,
        open(dest / "fixations.csv", "w", newline="") as fout,
    ):
        header_line = fin.readline()
        fout.write(header_line)
        header = next(csv.reader([header_line]))
        image_col, subject_col = header.index("image"), header.index("subject")
        for line in fin:
            row = next(csv.reader([line]))
            if row and row[image_col] in keep:
                fout.write(line)
                subjects.add(row[subject_col])
                n_rows += 1
    return len(names), len(subjects), n_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="full OSIE folder (stimuli/, fixations.csv)")
    parser.add_argument("dest", type=Path, help="output folder, e.g. data/osie-mini")
    parser.add_argument("--images", type=int, default=40, help="number of images (default 40)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    images, subjects, fixations = make_subset(args.source, args.dest, args.images)
    print(f"{args.dest}: {images} images, {subjects} subjects, {fixations} fixations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
