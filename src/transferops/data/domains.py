"""Data from the domain the model will serve, beside the labelled training data.

``data.unlabelled``: images from the new domain with no labels (a folder, searched
recursively; class folders, if any, are ignored); adaptation learns from them
(:mod:`transferops.adapt`). ``data.target_test``: a small labelled sample of the new domain
(class folders with the training data's class names; a few per class is enough); it is read
only to score adaptation, never to train or pseudo-label. ``data.auxiliary``: labelled
images from a related domain (last year's data, another site; class folders like the
training data's): adaptation trains the head on them too, each weighed by how much it looks
like the target (instance weights); never in val or test.

Both are decoded like the labelled splits (same size, same resize) into ``data.out/``
(``unlabelled.safetensors``, ``target_test.safetensors``) and hashed in the manifest under
``domains``, apart from ``data_hash``: adding unlabelled data does not retrain the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from transferops.config import DataConfig
from transferops.data.readers import read_image_folder
from transferops.errors import DataError
from transferops.model.inputs import decode_image
from transferops.runtime.artifacts import sha256_file, sha256_files

log = logging.getLogger(__name__)

UNLABELLED = "unlabelled"
TARGET_TEST = "target_test"
AUXILIARY = "auxiliary"
LABELLED = (TARGET_TEST, AUXILIARY)  # class folders named like the training classes
NO_LABEL = -1


def domain_files(d: DataConfig) -> dict[str, list[Path]]:
    """The image files of ``data.unlabelled`` and ``data.target_test`` (those set), for the
    prepare fingerprint; a clear error for a missing folder or a table."""
    out: dict[str, list[Path]] = {}
    for key in (UNLABELLED, TARGET_TEST, AUXILIARY):
        path = getattr(d, key)
        if path is None:
            continue
        path = Path(path)
        if d.format != "image_folder":
            raise DataError(
                f"data.{key}: only image folders can be used for adaptation so far (data.format "
                "is table); set data.{key}: null"
            )
        if not path.is_dir():
            raise DataError(f"data.{key}: {path} is not a folder of images")
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in d.image.extensions
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"data.{key}: no images ({', '.join(d.image.extensions)}) under {path}")
        out[key] = files
    return out


def domains_hash(d: DataConfig) -> str | None:
    """The content hash of the domain folders (None when neither is set)."""
    files = domain_files(d)
    if not files:
        return None
    return "+".join(sha256_files(fs, Path(getattr(d, k))) for k, fs in sorted(files.items()))


def write_domains(
    d: DataConfig, tmp: Path, class_names: list[str], size: int
) -> dict[str, dict[str, Any]]:
    """Decode the domain folders into `tmp` (the prepared folder being written); returns the
    manifest's ``domains`` entry: per split its count, artifact hash and source folder."""
    out: dict[str, dict[str, Any]] = {}
    for key, files in domain_files(d).items():
        if key in LABELLED:
            raw = read_image_folder(Path(getattr(d, key)), d.image.extensions)
            unknown = sorted({e.label for e in raw.examples} - set(class_names))
            if unknown:
                raise DataError(
                    f"data.{key}: class folder(s) {', '.join(unknown)} are not classes of "
                    f"data.path ({', '.join(class_names)}): name them like the training classes"
                )
            paths = [e.path for e in raw.examples]
            labels = [class_names.index(e.label) for e in raw.examples]
        else:
            paths, labels = files, [NO_LABEL] * len(files)
        images, keep = [], []
        for i, p in enumerate(paths):
            try:
                images.append(decode_image(p, size, d.image.resize))
                keep.append(i)
            except (OSError, ValueError) as exc:
                log.warning("data.%s: skipping %s (not a decodable image: %s)", key, p, exc)
        if not images:
            raise DataError(f"data.{key}: none of its {len(paths)} files could be decoded")
        tensors = {
            "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        }
        save_file(tensors, str(tmp / f"{key}.safetensors"))
        out[key] = {
            "count": len(keep),
            "path": str(getattr(d, key)),
            "sha256": sha256_file(tmp / f"{key}.safetensors"),
        }
        log.info("data.%s: %d images prepared", key, len(keep))
    return out
