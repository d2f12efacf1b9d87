"""The recorded-session reader: counts, session order, interleaving and clear errors on bad data."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from clients.recorded import (
    DatasetError,
    Fixation,
    RecordedDataset,
    bundled_dataset_path,
    default_dataset_path,
)
from learner.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
FULL_OSIE = REPO_ROOT.parent / "shared" / "data" / "osie"
HEADER = "image,subject,fix_index,x_px,y_px,duration_ms"

needs_full = pytest.mark.skipif(not FULL_OSIE.is_dir(), reason=f"{FULL_OSIE} not present")


def csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "fixations.csv", newline="") as f:
        return list(csv.DictReader(f))


def rows_csv(*rows: str) -> str:
    return "\n".join([HEADER, *rows]) + "\n"


def make_dataset(tmp_path: Path, csv_text: str, images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    """A tiny dataset folder with solid-colour 4x6 PNGs and the given CSV text."""
    (tmp_path / "stimuli").mkdir(parents=True)
    for name in images:
        cv2.imwrite(str(tmp_path / "stimuli" / name), np.full((4, 6, 3), 7, np.uint8))
    (tmp_path / "fixations.csv").write_text(csv_text)
    return tmp_path


@pytest.fixture(scope="module")
def mini() -> RecordedDataset:
    return RecordedDataset.open(bundled_dataset_path())


@pytest.fixture(scope="module")
def full() -> RecordedDataset:
    if not FULL_OSIE.is_dir():
        pytest.skip(f"{FULL_OSIE} not present")
    return RecordedDataset.open(FULL_OSIE)


# ------------------------------------------------------------------ counts and contents


def test_bundled_counts_match_csv_and_folder(mini: RecordedDataset) -> None:
    rows = csv_rows(bundled_dataset_path())
    files = sorted(p.name for p in (bundled_dataset_path() / "stimuli").iterdir())
    assert mini.images == files == [f"{1000 + i}.jpg" for i in range(1, 41)]
    assert len(mini.subjects) == 15 == len({r["subject"] for r in rows})
    assert mini.n_fixations == len(rows) == 5608
    assert mini.name == "osie-mini"
    assert mini.px_per_deg == 24.0
    assert "assumption" in mini.metadata["px_per_deg_note"].lower()
    assert (bundled_dataset_path() / "LICENSE").read_text().startswith("The MIT License")


@needs_full
def test_full_osie_counts(full: RecordedDataset) -> None:
    assert len(full.images) == 700
    assert full.subjects == [str(k) for k in range(1, 16)]
    assert full.n_fixations == 98_321
    assert full.px_per_deg is None  # the shared copy has no dataset.json: the scale is unknown


@needs_full
def test_bundled_subset_is_a_prefix_of_the_full_csv() -> None:
    mini_bytes = (bundled_dataset_path() / "fixations.csv").read_bytes()
    assert (FULL_OSIE / "fixations.csv").read_bytes().startswith(mini_bytes)
    for name in ("1001.jpg", "1040.jpg"):
        assert (bundled_dataset_path() / "stimuli" / name).read_bytes() == (
            FULL_OSIE / "stimuli" / name
        ).read_bytes()


def test_scanpath_matches_csv_rows(mini: RecordedDataset) -> None:
    rows = [r for r in csv_rows(bundled_dataset_path()) if (r["image"], r["subject"]) == ("1007.jpg", "12")]
    path = mini.scanpath("1007.jpg", 12)  # an int subject id is accepted
    assert [(f.fix_index, f.x, f.y, f.duration_ms) for f in path] == [
        (int(r["fix_index"]), float(r["x_px"]), float(r["y_px"]), float(r["duration_ms"])) for r in rows
    ]
    assert all(f.image == "1007.jpg" and f.subject == "12" for f in path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        path[0].x = 0.0  # type: ignore[misc]


def test_scanpath_sorted_by_fix_index_whatever_the_row_order(tmp_path: Path) -> None:
    rows = ("a.png,1,2,3,3,10", "a.png,1,0,1,1,10", "a.png,1,5,5,5,10")
    root = make_dataset(tmp_path, rows_csv(*rows))
    assert [f.fix_index for f in RecordedDataset.open(root).scanpath("a.png", "1")] == [0, 2, 5]


# ------------------------------------------------------------------ sessions


def test_session_order_and_resets(mini: RecordedDataset) -> None:
    events = list(mini.session("4"))
    rows = [r for r in csv_rows(bundled_dataset_path()) if r["subject"] == "4"]
    assert len(events) == len(rows)
    images_seen = [f.image for f, _ in events]
    assert images_seen == sorted(images_seen)  # image order = file-name order
    for (fix, reset), prev in zip(events, [None, *events[:-1]], strict=True):
        new_image = prev is None or prev[0].image != fix.image
        assert reset == new_image
        if not new_image:
            assert fix.fix_index > prev[0].fix_index  # type: ignore[index]
    assert sum(reset for _, reset in events) == 40


def test_session_image_selection(mini: RecordedDataset) -> None:
    first3 = list(mini.session("1", images=3))
    assert {f.image for f, _ in first3} == {"1001.jpg", "1002.jpg", "1003.jpg"}
    chosen = list(mini.session("1", images=["1010.jpg", "1002.jpg"]))
    assert [f.image for f, r in chosen if r] == ["1010.jpg", "1002.jpg"]
    assert list(mini.session("1", images=0)) == []
    with pytest.raises(DatasetError, match=r"9999\.jpg"):
        list(mini.session("1", images=["9999.jpg"]))
    with pytest.raises(DatasetError, match="subject '99'"):
        list(mini.session("99"))


def test_session_skips_images_without_fixations(tmp_path: Path) -> None:
    rows = ("a.png,1,0,1,1,10", "b.png,1,0,1,1,10", "b.png,1,1,2,2,10", "b.png,2,0,3,3,10")
    root = make_dataset(tmp_path, rows_csv(*rows))
    ds = RecordedDataset.open(root)
    assert [(f.image, r) for f, r in ds.session("2")] == [("b.png", True)]
    assert [(f.image, f.fix_index, r) for f, r in ds.session("1")] == [
        ("a.png", 0, True),
        ("b.png", 0, True),
        ("b.png", 1, False),
    ]
    assert ds.scanpath("a.png", "2") == []


def test_subjects_sort_naturally(tmp_path: Path) -> None:
    lines = [f"a.png,{s},0,1,1,10" for s in ("10", "2", "s10", "1", "s2", "21")]
    ds = RecordedDataset.open(make_dataset(tmp_path, rows_csv(*lines)))
    assert ds.subjects == ["1", "2", "10", "21", "s2", "s10"]


# ------------------------------------------------------------------ interleaving


def check_interleaving(
    ds: RecordedDataset, ticks: list[list[tuple[str, Fixation, bool]]], images: int | None
) -> None:
    per_stream: dict[str, list[tuple[Fixation, bool]]] = defaultdict(list)
    for tick in ticks:
        ids = [sid for sid, _, _ in tick]
        assert len(ids) == len(set(ids)), "a stream appears twice in one tick"
        assert ids == sorted(ids, key=lambda s: ds.subjects.index(s.removeprefix("subject-")))
        for sid, fix, reset in tick:
            assert sid == f"subject-{fix.subject}"
            per_stream[sid].append((fix, reset))
    for subject in ds.subjects:  # each stream is exactly its session, in order
        assert per_stream[f"subject-{subject}"] == list(ds.session(subject, images))
    assert sum(len(t) for t in ticks) == sum(len(v) for v in per_stream.values())
    sizes = [len(t) for t in ticks]
    assert sizes == sorted(sizes, reverse=True)  # ended sessions drop out, none come back


def test_interleaved_invariants_bundled(mini: RecordedDataset) -> None:
    ticks = list(mini.interleaved())
    check_interleaving(mini, ticks, None)
    assert sum(len(t) for t in ticks) == mini.n_fixations
    assert len(ticks[0]) == 15 and all(reset for _, _, reset in ticks[0])


@needs_full
def test_interleaved_invariants_full(full: RecordedDataset) -> None:
    ticks = list(full.interleaved())
    check_interleaving(full, ticks, None)
    assert sum(len(t) for t in ticks) == 98_321


def test_interleaved_uneven_sessions_and_subset(tmp_path: Path) -> None:
    rows = ("a.png,1,0,1,1,10", "a.png,2,0,1,1,10", "a.png,2,1,1,1,10", "b.png,2,0,1,1,10")
    root = make_dataset(tmp_path, rows_csv(*rows))
    ds = RecordedDataset.open(root)
    ticks = list(ds.interleaved())
    assert [[(s, f.image, f.fix_index, r) for s, f, r in t] for t in ticks] == [
        [("subject-1", "a.png", 0, True), ("subject-2", "a.png", 0, True)],
        [("subject-2", "a.png", 1, False)],
        [("subject-2", "b.png", 0, True)],
    ]
    assert [[s for s, _, _ in t] for t in ds.interleaved(subjects=["2", "1"], images=1)] == [
        ["subject-2", "subject-1"],
        ["subject-2"],
    ]
    with pytest.raises(DatasetError, match="repeat"):
        list(ds.interleaved(subjects=["1", "1"]))


# ------------------------------------------------------------------ images


def test_load_image_is_rgb_uint8(mini: RecordedDataset) -> None:
    img = mini.load_image("1001.jpg")
    assert img.shape == (600, 800, 3) and img.dtype == np.uint8
    bgr = cv2.imread(str(bundled_dataset_path() / "stimuli" / "1001.jpg"))
    assert bgr is not None
    assert not np.array_equal(bgr[..., 0], bgr[..., 2])  # the check below can tell channels apart
    np.testing.assert_array_equal(img[..., 0], bgr[..., 2])  # red first, OpenCV keeps red last
    np.testing.assert_array_equal(img, bgr[..., ::-1])
    assert not img.flags.writeable  # cached arrays cannot be changed by a caller
    assert mini.load_image("1001.jpg") is img


def test_load_image_refuses_unknown_names(mini: RecordedDataset) -> None:
    for name in ("nope.jpg", "../LICENSE", "../fixations.csv"):
        with pytest.raises(DatasetError, match="is not in"):
            mini.load_image(name)


def test_undecodable_image(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, rows_csv("a.png,1,0,1,1,10"))
    (root / "stimuli" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode"):
        RecordedDataset.open(root).load_image("a.png")


# ------------------------------------------------------------------ bad input


def test_missing_column_names_the_column(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "image,subject,fix_index,x_px,y_px\na.png,1,0,1,1\n")
    pattern = r"fixations.csv line 1: missing column\(s\) duration_ms"
    with pytest.raises(DatasetError, match=pattern) as e:
        RecordedDataset.open(root)
    assert isinstance(e.value, InputError)


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ("a.png,1,1,abc,1,10", r"line 3, column 'x_px': 'abc' is not a number"),
        ("a.png,1,1,1,nan,10", r"line 3, column 'y_px': 'nan' is not finite"),
        ("a.png,1,1,1,1,", r"line 3, column 'duration_ms': value is empty"),
        ("a.png,1,1,1,1,-5", r"line 3, column 'duration_ms': -5.0 must be >= 0"),
        ("a.png,1,1.5,1,1,10", r"line 3, column 'fix_index': '1.5' must be a whole number"),
        ("zzz.png,1,1,1,1,10", r"line 3, column 'image': 'zzz.png' is not in"),
        ("a.png,1,0,9,9,10", r"line 3, column 'fix_index': fixation 0 .* appears on line 2"),
    ],
)
def test_bad_row_names_line_and_column(tmp_path: Path, row: str, pattern: str) -> None:
    root = make_dataset(tmp_path, rows_csv("a.png,1,0,1,1,10", row))
    with pytest.raises(DatasetError, match=pattern) as e:
        RecordedDataset.open(root)
    assert str(root / "fixations.csv") in str(e.value)


def test_extra_columns_and_crlf_are_accepted(tmp_path: Path) -> None:
    text = "onset_ms,duration_ms,y_px,x_px,fix_index,subject,image\r\n0,10,2,1,0,1,a.png\r\n"
    root = make_dataset(tmp_path, text)
    (fix,) = RecordedDataset.open(root).scanpath("a.png", "1")
    assert (fix.x, fix.y, fix.duration_ms) == (1.0, 2.0, 10.0)


def test_missing_folder_parts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        RecordedDataset.open(tmp_path / "absent")
    with pytest.raises(DatasetError, match="stimuli"):
        RecordedDataset.open(tmp_path)
    (tmp_path / "stimuli").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        RecordedDataset.open(tmp_path)
    cv2.imwrite(str(tmp_path / "stimuli" / "a.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"fixations\.csv is missing"):
        RecordedDataset.open(tmp_path)


def test_dataset_json(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, rows_csv("a.png,1,0,1,1,10"))
    plain = RecordedDataset.open(root)
    assert (plain.name, plain.px_per_deg) == (root.name, None)
    (root / "dataset.json").write_text(json.dumps({"name": "demo", "px_per_deg": 30, "lab": "x"}))
    ds = RecordedDataset.open(root)
    assert (ds.name, ds.px_per_deg, ds.metadata["lab"]) == ("demo", 30.0, "x")
    assert RecordedDataset.open(root, px_per_deg=12.5).px_per_deg == 12.5  # the argument wins
    bad_files = [
        ("{", "not readable JSON"),
        ('{"px_per_deg": -1}', "positive"),
        ('{"px_per_deg": "24"}', "positive number or null"),
        ('{"name": 3}', "'name' must be a non-empty string"),
        ("[1]", "JSON object"),
    ]
    for bad, pattern in bad_files:
        (root / "dataset.json").write_text(bad)
        with pytest.raises(DatasetError, match=pattern):
            RecordedDataset.open(root)
    with pytest.raises(DatasetError, match="px_per_deg argument"):
        RecordedDataset.open(root, px_per_deg=0)
    with pytest.raises(DatasetError, match="no fixation rows"):
        RecordedDataset.open(make_dataset(tmp_path / "b", rows_csv()))


# ------------------------------------------------------------------ paths


def test_default_dataset_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FOVEATE_DATASET", str(tmp_path))
    assert default_dataset_path() == tmp_path
    monkeypatch.delenv("FOVEATE_DATASET")
    expected = FULL_OSIE if FULL_OSIE.is_dir() else REPO_ROOT / "data" / "osie-mini"
    assert default_dataset_path() == expected
    assert bundled_dataset_path() == REPO_ROOT / "data" / "osie-mini"
