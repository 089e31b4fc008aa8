"""`transferops init`: a project of the user's own, next to their data; no silent demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from transferops.cli import app
from transferops.config import load_config
from transferops.pipeline.project import TEMPLATES, set_value

from .conftest import REPO, write_image_folder

runner = CliRunner()
DVC = str(Path(sys.executable).parent / "dvc")


def test_the_templates_are_the_repositorys_params_and_dvc_yaml():
    for name in ("params.yaml", "dvc.yaml"):
        assert (TEMPLATES / name).read_text() == (REPO / name).read_text(), name


def test_set_value_keeps_every_comment_and_other_line():
    text = (TEMPLATES / "params.yaml").read_text()
    out = set_value(text, "data.table.label_column", "kind")
    assert "    label_column: kind" in out and out.count("\n") == text.count("\n")
    out = set_value(out, "data.demo", None)
    assert "  demo: null" in out and "# built-in dataset written to `path`" in out
    assert yaml.safe_load(out)["data"]["table"]["label_column"] == "kind"


def _init(tmp_path: Path, *args: str) -> str:
    r = runner.invoke(app, ["init", str(tmp_path / "proj"), *args])
    assert r.exit_code == 0, r.output
    return r.output


def _dry_repro(project: Path) -> str:
    """DVC accepts the whole pipeline (`dvc dag` parses every stage, params interpolated) and
    would run its first stage (`--dry`: later stages' inputs do not exist yet)."""
    subprocess.run([DVC, "init", "-q", "--no-scm"], cwd=project, check=True)
    out = ""
    for cmd in (["dag"], ["repro", "--dry", "prepare"]):
        r = subprocess.run([DVC, *cmd], cwd=project, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out += r.stdout
    assert "promote" in out and "evaluate" in out  # the dag holds every stage
    return out


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_init_on_an_image_folder(tmp_path, layout):
    data = tmp_path / "proj" / "images"
    if layout == "splits":
        write_image_folder(data / "train", per_class=4)
        write_image_folder(data / "test", per_class=2)
    else:
        write_image_folder(data, per_class=4)
    out = _init(tmp_path, "--data", str(data))
    said = " ".join(out.split())
    expected = "with train/val/test folders" if layout == "splits" else "one folder per class"
    assert f"image folder ({expected})" in said and "3 classes" in said
    assert "warning" not in said  # nothing prepare would stop at
    assert "next: cd" in said and "transferops run" in said
    project = tmp_path / "proj"
    cfg = load_config(project / "params.yaml")
    assert cfg.data.demo is None and cfg.data.path == Path("images")
    assert cfg.data.format == "image_folder" and cfg.data.limit_per_class is None
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    assert "demo_data" not in dvc_yaml["stages"]
    assert not any(
        str(d).startswith("src/") for s in dvc_yaml["stages"].values() for d in s.get("deps", [])
    )
    assert "Running stage 'prepare'" in _dry_repro(project)
    # a second init keeps what is there, unless asked
    r = runner.invoke(app, ["init", str(project), "--data", str(data)])
    assert r.exit_code == 2 and "already there" in r.output and "--force" in r.output


def test_init_warns_about_a_class_too_small_to_split_before_the_first_run(tmp_path):
    data = write_image_folder(tmp_path / "images", per_class=4)
    write_image_folder(tmp_path / "images", per_class=2, classes=(3,))  # 'three': 2 images
    said = " ".join(_init(tmp_path, "--data", str(data)).split())
    assert "4 classes" in said and "warning: prepare will stop here" in said
    assert "'three' (2)" in said and "zero" not in said.split("warning:")[1]
    assert "next: fix what the warning says, then cd" in said
    assert (tmp_path / "proj" / "params.yaml").exists()  # the project is written all the same
    # a table: the same check through the table reader
    rows = [f"text {i},{'a' if i < 10 else 'b'}" for i in range(12)]  # 'b': 2 rows
    (tmp_path / "t.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    r = runner.invoke(app, ["init", str(tmp_path / "tproj"), "--data", str(tmp_path / "t.csv")])
    assert r.exit_code == 0 and "'b' (2)" in " ".join(r.output.split())


def test_init_on_a_csv_with_other_column_names(tmp_path):
    table = tmp_path / "reviews.csv"
    rows = [
        f"{'great and works' if i % 2 else 'broke after a day'} {i},"
        f"{'pos' if i % 2 else 'neg'},{'train' if i < 8 else 'test'}"
        for i in range(12)
    ]
    table.write_text("\ufeffreview,sentiment,subset\n" + "\n".join(rows) + "\n")
    out = " ".join(_init(tmp_path, "--data", str(table)).split())
    assert "table of texts" in out and "'review'" in out and "'sentiment'" in out
    cfg = load_config(tmp_path / "proj" / "params.yaml")
    t = cfg.data.table
    assert (t.text_column, t.label_column, t.split_column) == ("review", "sentiment", "subset")
    assert cfg.data.format == "table" and cfg.source.kind == "hf"
    assert cfg.data.path == table  # outside the project: absolute
    _dry_repro(tmp_path / "proj")


def test_no_params_file_is_one_line_naming_init(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["prepare"])
    assert r.exit_code == 2 and "no params.yaml in" in r.output
    assert "transferops init" in r.output
    assert not (tmp_path / "data").exists()  # no demo written on the code's defaults
