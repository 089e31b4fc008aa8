"""`transferops predict`: a registered model on new images or texts, from any folder.

What the README's pyfunc snippet does, without its traps: the registry is the project's
configured store (a relative sqlite path is taken relative to the params file, not to the
folder the command runs in, where MLflow would silently create an empty store), a missing
alias says which versions and aliases exist, and inputs may be image files, folders of
images, or a CSV / text file of texts.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from transferops.config import IMAGE_EXTENSIONS, Config
from transferops.errors import DataError, RegistryError
from transferops.model.folder import load_finetuned
from transferops.model.inputs import pick_device
from transferops.model.predict import predict_probs, raw_inputs
from transferops.registry.client import download_model_folder, registered_version
from transferops.runtime.tracking import absolute_uri

log = logging.getLogger(__name__)


def gather(paths: list[Path], modality: str, column: str) -> tuple[list[str], list]:
    """(names, items) to predict: image files and folders of images, or texts from CSV
    files (column `column`) and text files (one text per line)."""
    names: list[str] = []
    items: list = []
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if modality == "image":
            files = (
                sorted(
                    f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                )
                if p.is_dir()
                else [p]
            )
            names += [str(f) for f in files]
            items += [str(f) for f in files]
        elif p.suffix.lower() in (".csv", ".tsv"):
            df = pd.read_csv(p, sep=None, engine="python", encoding="utf-8-sig")
            if column not in df.columns:
                raise DataError(
                    f"{p}: no column {column!r} (columns: {list(df.columns)}); use --column"
                )
            texts = df[column].astype(str).tolist()
            names += [f"{p}:{i + 2}" for i in range(len(texts))]  # the line in the file
            items += texts
        else:
            texts = [t for t in p.read_text(encoding="utf-8").splitlines() if t.strip()]
            names += [f"{p}:{i + 1}" for i in range(len(texts))]
            items += texts
    if not items:
        raise DataError(f"nothing to predict in {', '.join(map(str, paths))}")
    return names, items


def predict_registered(
    cfg: Config, project: Path, model: str, paths: list[Path], column: str = "text"
) -> pd.DataFrame:
    """Labels and confidences of the registered `model` for `paths` (one row per input)."""
    registry = absolute_uri(cfg.tracking.uri, project)  # the project's store, not the cwd's
    reg = registered_version(model, registry, key="--model")
    name, version = reg["model"], reg["version"]
    with tempfile.TemporaryDirectory(prefix="transferops-predict-") as tmp:
        folder = download_model_folder(name, version, tmp, registry)
        if folder is None:
            raise RegistryError(f"{name} v{version} holds no transferops model folder")
        net, spec = load_finetuned(folder)
        names, items = gather(paths, spec["modality"], column)
        skipped: list[tuple[int, str]] = []
        inputs = raw_inputs(spec, folder, items, skipped)
        for i, why in skipped:  # one bad file does not fail the batch
            log.warning("skipped %s: cannot be decoded (%s)", names[i], why)
        bad = {i for i, _ in skipped}
        names = [n for i, n in enumerate(names) if i not in bad]
        if not names:
            raise DataError(f"no input could be decoded ({len(skipped)} skipped; see above)")
        probs = predict_probs(net, spec, inputs, pick_device("auto"))
    classes = spec["class_names"]
    out = pd.DataFrame(
        {
            "input": names,
            "label": [classes[i] for i in probs.argmax(1)],
            "confidence": probs.max(1).round(4),
        }
    )
    full = pd.concat(
        [out, pd.DataFrame(probs.round(4), columns=[f"p_{c}" for c in classes])], axis=1
    )
    full.attrs["model"] = f"{name} v{version}"
    full.attrs["skipped"] = len(skipped)
    return full
