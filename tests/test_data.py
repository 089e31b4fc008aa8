"""Readers and `prepare` on small real data, including every bad input of the issue."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from transferops.config import validate_config
from transferops.data.demo import parse_fortune_file, write_demo
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared, prepared_data_hash, read_manifest
from transferops.errors import DataError

from .conftest import write_image_folder


def cfg_for(path: Path, out: Path, **data) -> object:
    raw = {"data": {"demo": None, "path": str(path), "out": str(out), **data}}
    return validate_config(raw)


# --------------------------------------------------------------- image folders


def test_image_folder_random_split_is_stratified_and_deterministic(tmp_path, image_folder):
    out = tmp_path / "prep"
    res = prepare(cfg_for(image_folder, out, image={"size": 16}))
    assert not res.skipped and res.counts == {"train": 12, "val": 3, "test": 3}
    m = read_manifest(out)
    assert m["class_names"] == ["one", "two", "zero"]
    assert all(
        m["counts"][s] == {"one": n, "two": n, "zero": n}
        for s, n in [("train", 4), ("val", 1), ("test", 1)]
    )
    train = load_prepared(out, "train")
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape) == (12, 3, 16, 16)
    assert sorted(train.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # Same seed -> same bytes; another seed -> another split.
    out2 = tmp_path / "prep2"
    assert prepare(cfg_for(image_folder, out2, image={"size": 16})).data_hash == res.data_hash
    other = prepare(cfg_for(image_folder, tmp_path / "p3", image={"size": 16}, splits={"seed": 1}))
    assert other.data_hash != res.data_hash


def test_new_examples_do_not_move_trained_examples_into_test(tmp_path):
    """A scheduled rerun on grown data: nothing an earlier model trained on becomes test data
    (so re-scoring the champion on the new test split is honest)."""
    from transferops.data.prepare import assign_splits
    from transferops.data.readers import read_dataset

    def splits(cfg) -> dict[str, set[str]]:
        got = assign_splits(read_dataset(cfg.data), cfg.data)
        return {s: {e.path.relative_to(root).as_posix() for e in exs} for s, exs in got.items()}

    root = write_image_folder(tmp_path / "raw", per_class=20)
    cfg = cfg_for(root, tmp_path / "prep")
    before = splits(cfg)
    write_image_folder(root, per_class=30)  # 000-019 unchanged, 020-029 new in every class
    after = splits(cfg)
    assert {s: len(v) for s, v in after.items()} == {"train": 66, "val": 12, "test": 12}
    assert not before["train"] & after["test"]
    assert before["test"] <= after["test"] | after["val"]
    assert splits(cfg) == after  # deterministic


def test_rerun_unchanged_does_nothing_and_change_reruns(tmp_path, image_folder):
    out = tmp_path / "prep"
    cfg = cfg_for(image_folder, out, image={"size": 16})
    first = prepare(cfg)
    mtime = (out / "train.safetensors").stat().st_mtime_ns
    again = prepare(cfg)
    assert again.skipped and again.data_hash == first.data_hash
    assert (out / "train.safetensors").stat().st_mtime_ns == mtime
    # Changing one source image changes the content hash and reruns.
    img = next((image_folder / "one").glob("*.png"))
    Image.new("RGB", (8, 8), (255, 255, 255)).save(img)
    changed = prepare(cfg)
    assert not changed.skipped and changed.data_hash != first.data_hash
    assert prepared_data_hash(out) == changed.data_hash


def test_split_folders_jpeg_and_png_and_stray_files(tmp_path, caplog):
    root = tmp_path / "raw"
    write_image_folder(root / "train", per_class=5, ext=".jpg")
    write_image_folder(root / "validation", per_class=2, ext=".png")
    write_image_folder(root / "test", per_class=3, ext=".JPEG")
    (root / "README.txt").write_text("not an image")
    (root / "train" / "one" / "notes.csv").write_text("a,b\n")
    (root / "train" / "one" / ".DS_Store").write_bytes(b"\0\0")
    out = tmp_path / "prep"
    with caplog.at_level(logging.WARNING):
        res = prepare(cfg_for(root, out, image={"size": 12}))
    assert res.counts == {"train": 15, "val": 6, "test": 9}  # the given splits, untouched
    m = read_manifest(out)
    # README.txt, notes.csv and .DS_Store: ignored, and counted as the README says
    assert m["source"]["given_splits"] is True and m["ignored_files"] == 3
    assert "ignored 3 file(s) that are not images" in caplog.text
    # mode: random pools them and re-splits by seed.
    res2 = prepare(cfg_for(root, tmp_path / "p2", image={"size": 12}, splits={"mode": "random"}))
    assert sum(res2.counts.values()) == 30 and res2.counts["train"] != 15


def test_missing_val_folder_is_carved_from_train(tmp_path):
    root = tmp_path / "raw"
    write_image_folder(root / "train", per_class=10)
    write_image_folder(root / "test", per_class=2)
    res = prepare(cfg_for(root, tmp_path / "prep", image={"size": 8}))
    # val = round(10 * 0.15) = 2 per class, from train; test stays the given one.
    assert res.counts == {"train": 24, "val": 6, "test": 6}


def test_limit_per_class_makes_nested_few_shot_subsets(tmp_path):
    root = write_image_folder(tmp_path / "raw", per_class=20)
    full = prepare(cfg_for(root, tmp_path / "full", image={"size": 8}))
    few = prepare(cfg_for(root, tmp_path / "few", image={"size": 8}, limit_per_class=3))
    assert few.counts["train"] == 9 and few.counts["val"] == full.counts["val"]
    a, b = load_prepared(tmp_path / "full", "test"), load_prepared(tmp_path / "few", "test")
    assert torch.equal(a.images, b.images)  # the test split does not depend on the limit


def test_color_and_odd_sizes_are_resized_once(tmp_path):
    root = tmp_path / "raw"
    for cls, color in [("red", (255, 0, 0)), ("blue", (0, 0, 255))]:
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGBA" if i % 2 else "RGB", (40 + i * 7, 23 + i), color).save(
                root / cls / f"{i}.png"
            )
    prepare(cfg_for(root, tmp_path / "prep", image={"size": 10}))
    train = load_prepared(tmp_path / "prep", "train")
    assert tuple(train.images.shape[1:]) == (3, 10, 10)
    red = train.images[train.labels == train.class_names.index("red")]
    assert (red[:, 0] == 255).all() and (red[:, 2] == 0).all()


def test_a_large_jpeg_photo_is_decoded_at_a_reduced_scale_with_the_same_pixels(
    tmp_path, monkeypatch
):
    """A phone photo is 10-50x the side kept: the JPEG decoder scales it in the DCT (never
    below the side kept), and the result matches a full-size decode within a grey level."""
    import numpy as np
    from PIL import ImageOps, JpegImagePlugin
    from sklearn.datasets import load_sample_image

    from transferops.model.inputs import decode_image

    photo = tmp_path / "photo.jpg"
    Image.fromarray(load_sample_image("flower.jpg")).resize((2400, 1600)).save(photo, quality=90)
    decoded_at: list[tuple[int, int]] = []
    full_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded_at.append(self.size)
        return full_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    px = decode_image(photo, 96, "crop")
    assert px.shape == (96, 96, 3)
    assert decoded_at and min(decoded_at[0]) < 1600 and min(decoded_at[0]) >= 96
    with Image.open(photo) as im:  # the reference: every pixel decoded
        ref = np.asarray(ImageOps.fit(im.convert("RGB"), (96, 96), Image.Resampling.BILINEAR))
    assert np.abs(px.astype(int) - ref).mean() < 1.5


@pytest.mark.parametrize(
    ("side", "auto_max", "chosen"),
    [(8, 128, 64), (80, 128, 96), (300, 128, 128), (300, 256, 256)],
)
def test_auto_image_size_follows_the_images(tmp_path, caplog, side, auto_max, chosen):
    """auto: the images' median shorter side rounded up to a multiple of 32, never below the
    64 px a 32x-downsampling backbone needs, never above auto_max; the log says why."""
    root = tmp_path / "raw"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (side + 20, side + i % 2), (i * 40, 0, 0)).save(
                root / cls / f"{i}.png"
            )
    caplog.set_level(logging.INFO, logger="transferops")
    r = prepare(cfg_for(root, tmp_path / "prep", image={"size": "auto", "auto_max": auto_max}))
    assert read_manifest(r.out)["image_size"] == chosen
    assert load_prepared(r.out, "train").images.shape[-1] == chosen
    assert f"data.image.size: auto -> {chosen} px (median shorter side {side} px" in caplog.text


def test_explicit_size_below_the_images_warns(tmp_path, caplog):
    root = tmp_path / "raw"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    prepare(cfg_for(root, tmp_path / "prep", image={"size": 32}))
    assert "data.image.size 32 downsizes your images (median shorter side 64 px)" in caplog.text


# ----------------------------------------------------------------------- tables


def test_csv_with_other_column_names_and_split_column(tmp_path):
    table = tmp_path / "reviews.csv"
    rows = ["body;sentiment;part"]
    for i in range(12):
        rows.append(f"great thing {i};pos;{['train', 'train', 'valid', 'test'][i % 4]}")
        rows.append(f"awful thing {i};neg;{['train', 'train', 'valid', 'test'][i % 4]}")
    table.write_text("\n".join(rows) + "\n")
    cfg = cfg_for(
        table,
        tmp_path / "prep",
        format="table",
        table={"text_column": "body", "label_column": "sentiment", "split_column": "part"},
    )
    res = prepare(cfg)
    assert res.counts == {"train": 12, "val": 6, "test": 6}
    test = load_prepared(tmp_path / "prep", "test")
    assert test.modality == "text" and test.class_names == ["neg", "pos"]
    assert all("thing" in t for t in test.texts)


def test_jsonl_table(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"t": f"text {i}", "y": i % 2}) + "\n" for i in range(20)))
    res = prepare(
        cfg_for(
            p, tmp_path / "prep", format="table", table={"text_column": "t", "label_column": "y"}
        )
    )
    assert sum(res.counts.values()) == 20


def test_image_path_table(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    lines = ["file,kind"] + [
        f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))
    ]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    prepare(
        cfg_for(
            tmp_path / "labels.csv",
            tmp_path / "prep",
            format="table",
            image={"size": 8},
            table={"image_column": "file", "label_column": "kind"},
        )
    )
    assert load_prepared(tmp_path / "prep", "train").images.shape[0] == 6


# ------------------------------------------------------------------------- demo


def test_demo_datasets_are_real_and_complete(tmp_path):
    write_demo("digits", tmp_path / "digits")
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [str(i) for i in range(10)]
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797
    csv = write_demo("fortunes", tmp_path / "f.csv")
    res = prepare(cfg_for(csv, tmp_path / "prep", format="table"))
    m = read_manifest(tmp_path / "prep")
    assert len(m["class_names"]) == 10 and "computers" in m["class_names"]
    assert sum(res.counts.values()) > 3000


def test_prepare_writes_the_demo_when_path_is_missing(tmp_path):
    cfg = validate_config(
        {
            "data": {
                "demo": "digits",
                "path": str(tmp_path / "raw"),
                "out": str(tmp_path / "prep"),
                "limit_per_class": 5,
                "image": {"size": 8},
            }
        }
    )
    res = prepare(cfg)
    assert res.counts["train"] == 50 and (tmp_path / "raw" / "7").is_dir()


def test_parse_fortune_file():
    assert parse_fortune_file("a\nb\n%\n\n%\nc\n%\n") == ["a\nb", "c"]


# ------------------------------------------------------------------- bad inputs


def _bad(cfg) -> str:
    with pytest.raises(DataError) as ei:
        prepare(cfg)
    return str(ei.value)


def test_missing_folder(tmp_path):
    msg = _bad(cfg_for(tmp_path / "nope", tmp_path / "prep"))
    assert "data.path" in msg and str(tmp_path / "nope") in msg and "does not exist" in msg


def test_empty_class_folders_are_skipped_or_all_named(tmp_path, image_folder, caplog):
    for name in ("three", "four"):
        (image_folder / name).mkdir()
        (image_folder / name / "readme.md").write_text("x")
    msg = _bad(cfg_for(image_folder, tmp_path / "prep", on_empty_class="fail"))
    assert "2 class folder(s)" in msg and "three" in msg and "four" in msg  # all, at once
    assert "data.on_empty_class: skip" in msg
    r = prepare(cfg_for(image_folder, tmp_path / "prep"))  # default: skip with one warning
    assert read_manifest(r.out)["class_names"] == ["one", "two", "zero"]
    assert "skipped 2 class folder(s) with no image files: four, three" in caplog.text


def test_many_bad_files_warn_a_few_times_and_the_manifest_lists_them(
    tmp_path, image_folder, caplog
):
    for i in range(30):
        (image_folder / "one" / f"broken{i}.png").write_bytes(b"not a png")
    r = prepare(cfg_for(image_folder, tmp_path / "prep"))
    per_file = [m for m in caplog.messages if m.startswith("skipping ")]
    assert len(per_file) == 5
    assert (
        "skipped 30 undecodable file(s)" in caplog.text and "listed in the manifest" in caplog.text
    )
    m = read_manifest(r.out)["skipped_files"]
    assert m["count"] == 30 and len(m["files"]) == 30


def test_only_one_class(tmp_path):
    root = write_image_folder(tmp_path / "raw", classes=(1,))
    msg = _bad(cfg_for(root, tmp_path / "prep"))
    assert "only class 'one'" in msg and "at least 2 classes" in msg


def test_classes_with_too_few_examples_are_all_named(tmp_path):
    root = write_image_folder(tmp_path / "raw", per_class=6)
    for cls, keep in (("two", 2), ("zero", 1)):
        for p in sorted((root / cls).glob("*.png"))[keep:]:
            p.unlink()
    msg = _bad(cfg_for(root, tmp_path / "prep"))
    assert "2 class(es) have too few examples" in msg and "at least 3" in msg
    assert "'two' (2), 'zero' (1)" in msg and "remove these classes" in msg
    assert "data.on_small_class: skip" in msg
    # skipping them would leave one class: still an error, saying so
    msg = _bad(cfg_for(root, tmp_path / "prep", on_small_class="skip"))
    assert "that would leave 1 class" in msg


def test_a_class_too_small_to_split_is_left_out_only_when_asked_and_named_everywhere(
    tmp_path, caplog
):
    from transferops.evaluation.report import data_line

    root = write_image_folder(tmp_path / "raw", per_class=6, classes=(0, 1, 2, 3))
    for p in sorted((root / "zero").glob("*.png"))[1:]:
        p.unlink()
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(root, tmp_path / "prep", on_small_class="skip", image={"size": 12}))
    m = read_manifest(tmp_path / "prep")
    assert m["class_names"] == ["one", "three", "two"]  # no output for a class never trained
    assert m["left_out_classes"] == {"zero": 1}
    assert "'zero' (1): left out (data.on_small_class: skip)" in caplog.text
    line = data_line(
        {"data_hash": m["data_hash"], "data": {"path": str(root), "left_out_classes": {"zero": 1}}}
    )
    assert "Left out, too few examples to split" in line and "'zero' (1)" in line
    from transferops.registry.model_card import _caveats

    card = " ".join(
        _caveats(
            {"candidate": "ensemble"},
            {"data": {"left_out_classes": {"zero": 1}}, "finetuned": {"minus": {}}},
        )
    )
    assert "zero were in the data but left out" in card and "does not know them" in card


def test_corrupt_image_skip_or_fail(tmp_path, image_folder, caplog):
    bad = image_folder / "one" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    msg = _bad(cfg_for(image_folder, tmp_path / "prep", on_bad_file="fail"))
    assert str(bad) in msg and "data.on_bad_file: skip" in msg
    assert not (tmp_path / "prep").exists()  # nothing half-written
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(image_folder, tmp_path / "prep", on_bad_file="skip"))
    m = read_manifest(tmp_path / "prep")
    assert m["skipped_files"] == {"count": 1, "files": [str(bad)]}
    assert sum(sum(c.values()) for c in m["counts"].values()) == 18
    assert "broken.jpg" in caplog.text
    # a file over Pillow's safety limit (a scan, a panorama) is named with the fix
    bad.unlink()
    Image.new("L", (20_000, 9_000)).save(image_folder / "two" / "panorama.png")  # 180 Mpx
    msg = _bad(cfg_for(image_folder, tmp_path / "prep2", on_bad_file="fail"))
    assert "panorama.png: too large to decode safely" in msg and "smaller copy" in msg


def test_failure_keeps_earlier_output(tmp_path, image_folder):
    out = tmp_path / "prep"
    good = prepare(cfg_for(image_folder, out))
    (image_folder / "one" / "broken.png").write_bytes(b"garbage")
    _bad(cfg_for(image_folder, out, on_bad_file="fail"))
    assert prepared_data_hash(out) == good.data_hash
    assert load_prepared(out, "train").images.shape[0] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prep")]  # no temp left


def test_unreadable_csv(tmp_path):
    p = tmp_path / "data.csv"
    p.write_bytes(b'text,label\n"unterminated,quote\n\xff\xfe\x00bad')
    msg = _bad(cfg_for(p, tmp_path / "prep", format="table"))
    assert str(p) in msg and "could not read" in msg


def test_label_column_missing(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("review,stars\nnice,5\nbad,1\n")
    msg = _bad(cfg_for(p, tmp_path / "prep", format="table", table={"text_column": "review"}))
    assert "data.table.label_column" in msg and "'label'" in msg and "review, stars" in msg


def test_given_mode_without_split_folders(tmp_path, image_folder):
    msg = _bad(cfg_for(image_folder, tmp_path / "prep", splits={"mode": "given"}))
    assert "data.splits.mode" in msg


def test_table_pointing_at_folder(tmp_path, image_folder):
    msg = _bad(cfg_for(image_folder, tmp_path / "prep", format="table"))
    assert "is a folder" in msg and "data.format" in msg


def test_copy_of_prepared_data_keeps_hash(tmp_path, image_folder):
    out = tmp_path / "prep"
    h = prepare(cfg_for(image_folder, out)).data_hash
    shutil.copytree(out, tmp_path / "copy")
    assert prepared_data_hash(tmp_path / "copy") == h


def test_exact_copies_across_splits_are_counted_and_named(tmp_path, caplog):
    root = tmp_path / "raw"
    write_image_folder(root / "train", per_class=4)
    write_image_folder(root / "test", per_class=2, classes=(0, 1, 2))
    # the test split holds the train images' first drawings: digit_images takes the first N
    out = tmp_path / "prep"
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(root, out, image={"size": 12}))
    assert read_manifest(out)["duplicates_across_splits"] == 6
    assert "6 example(s) are exact copies of one in another split" in caplog.text
    assert "train/one/000.png = test/one/000.png" in caplog.text
    shutil.rmtree(root / "test")
    write_image_folder(root / "train", per_class=4)  # unchanged: no copies once split
    prepare(cfg_for(root, tmp_path / "p2", image={"size": 12}))
    assert read_manifest(tmp_path / "p2")["duplicates_across_splits"] == 0


def test_a_copy_under_another_class_is_named_as_a_label_conflict(tmp_path, caplog):
    """The same image in two class folders, the same text with two labels: one of each pair
    is mislabelled (or the classes overlap). prepare says which, before any training."""
    root = tmp_path / "raw"
    write_image_folder(root, per_class=6)
    shutil.copy(root / "one" / "000.png", root / "zero" / "from_one.png")
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(root, tmp_path / "prep", image={"size": 12}))
    assert read_manifest(tmp_path / "prep")["conflicting_labels"] == 1
    assert "1 example(s) are exact copies of one labelled with another class" in caplog.text
    assert "one/000.png (one)" in caplog.text and "zero/from_one.png (zero)" in caplog.text
    table = tmp_path / "t.csv"
    rows = [f"text {i} about {c},{c}" for c in "ab" for i in range(8)] + ["text 0 about a,b"]
    table.write_text("text,label\n" + "\n".join(rows) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(table, tmp_path / "pt", format="table"))
    assert read_manifest(tmp_path / "pt")["conflicting_labels"] == 1
    assert "'text 0 about a' (a)" in caplog.text and "'text 0 about a' (b)" in caplog.text
    # one class spelt two ways in a hand-kept table: named, left as the data has it
    table.write_text("text,label\n" + "\n".join([*rows, "text 9 about a, A "]) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(table, tmp_path / "pt", format="table", on_small_class="skip"))
    assert "1 label(s) are spelt more than one way" in caplog.text
    assert "'A' (1) / 'a' (8)" in caplog.text
