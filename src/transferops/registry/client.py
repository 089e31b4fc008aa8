"""Finding and fetching a model that `transferops register` put in an MLflow registry.

Shared by the ``mlflow`` source kind (a registered model as the source of a new fine-tune)
and promotion (re-scoring the champion on a new test split): one way to resolve
``models:/<name>@<alias>`` or ``/<version>``, one way to download its model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferops.config import registered_model_uri
from transferops.errors import RegistryError, SourceError
from transferops.model.folder import SPEC_FILE, WEIGHTS_FILE, verify_weights
from transferops.runtime.redact import mask
from transferops.runtime.tracking import check_reachable, client_uri

# The aliases a version moves through: register points challenger at a new version;
# promote moves champion only through the gates.
CHALLENGER = "challenger"
CHAMPION = "champion"


def registered_version(uri: str, registry_uri: str, key: str = "source.name") -> dict[str, Any]:
    """Resolve ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in a registry
    (`key`: the setting or option it came from, named in errors)."""
    parsed = registered_model_uri(uri)
    if parsed is None:
        raise SourceError(
            f"{key}: {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>"
        )
    name, alias, version = parsed
    if registry_uri.startswith("sqlite:///"):
        db = Path(registry_uri.removeprefix("sqlite:///"))
        if not db.exists():  # MLflow would silently create an empty registry there
            raise SourceError(
                f"{key}: {uri} cannot be looked up: the registry {registry_uri} does not "
                "exist; point at the MLflow store that holds it (tracking.uri, or "
                "source.registry_uri for a source)"
            )
    from mlflow import MlflowClient  # MLflow costs seconds to import: only when used
    from mlflow.exceptions import MlflowException

    check_reachable(key, registry_uri)
    real = client_uri(registry_uri, "source.registry_uri")
    client = MlflowClient(tracking_uri=real, registry_uri=real)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise SourceError(
            f"{key}: {uri} is not in the registry {mask(registry_uri)}. {_holdings(client, name)}"
        ) from None
    return {
        "uri": uri,
        "model": name,
        "alias": alias,
        "version": int(mv.version),
        "run_id": mv.run_id,
        "model_sha256": mv.tags.get("model_sha256"),
        "registry_uri": registry_uri,
    }


def _holdings(client: Any, name: str) -> str:
    """What the registry holds, for an error: the model's versions and aliases, or the
    registered model names."""
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        return (
            f"Registered models there: {', '.join(known) or 'none'}; register one with "
            "`transferops register`"
        )
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    held = ", ".join(
        f"v{v.version}" + "".join(f" @{a}" for a, n in aliases.items() if str(n) == str(v.version))
        for v in sorted(versions, key=lambda v: int(v.version))
    )
    return (
        f"{name} has {held}. A model that did not pass the promotion gates is not "
        f"champion: use models:/{name}@challenger or models:/{name}/<version>"
    )


def download_model_folder(
    name: str, version: str | int, dst: Path | str, registry_uri: str | None = None
) -> Path | None:
    """Download a registered version into `dst`; the transferops model folder inside it
    (the pyfunc's ``model`` artifact, see :mod:`transferops.registry.register`), or None if it has
    none. Its weights are checked against the version's ``model_sha256`` tag
    (:class:`~transferops.errors.IntegrityError` on a mismatch). `registry_uri` None: the
    registry MLflow is set up for."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    real = client_uri(registry_uri, "source.registry_uri") if registry_uri else None
    client = MlflowClient(tracking_uri=real, registry_uri=real)
    where = client.get_model_version_download_uri(name, str(version))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=where, dst_path=str(dst), tracking_uri=real
            )
        )
    except (OSError, MlflowException) as exc:
        raise RegistryError(
            f"{name} v{version}: its artifacts at {mask(where)} cannot be read ({exc}); "
            "restore them, or register the model again (`transferops run`)"
        ) from None
    if not (local / "MLmodel").exists():
        return None
    flavors = yaml.safe_load((local / "MLmodel").read_text()).get("flavors", {})
    rel = flavors.get("python_function", {}).get("artifacts", {}).get("model", {}).get("path")
    folder = local / rel if rel else None
    if folder is None or not (folder / SPEC_FILE).exists():
        return None
    expected = client.get_model_version(name, str(version)).tags.get("model_sha256")
    verify_weights(
        folder,
        expected,
        f"{name} v{version}'s model_sha256 tag",
        shown=f"{mask(where)}/{rel}/{WEIGHTS_FILE}",
    )
    return folder
