"""Shared fixtures: the real data beside the checkout (../shared/data), skipped with a reason if absent."""
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def fer_dir() -> Path:
    path = SHARED_DATA / "fer2013"
    if not (path / "train").is_dir():
        pytest.skip(f"real FER-2013 not found at {path}")
    return path


@pytest.fixture(scope="session")
def sequences_dir() -> Path:
    path = SHARED_DATA / "sequences"
    if not (path / "labels.csv").is_file():
        pytest.skip(f"real CK+ sequences not found at {path}")
    return path


def load_stage(name: str):
    """Import stages/<name>.py as a module, to call its main(argv) in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def landmarks_and_soft_guide(params: str, out) -> None:
    """The landmarks and soft-guide stages by hand on <out>/ingest/images.h5 and <out>/gray48/images.h5 (one
    worker, no sheets): <out>/landmarks/landmarks.h5 and <out>/guides/soft.h5."""
    load_stage("landmarks").main(["--params", params, "--images", f"{out}/ingest/images.h5",
                                  "--out", f"{out}/landmarks/landmarks.h5", "--metrics", f"{out}/lm.json",
                                  "--sheet", "", "-S", "landmarks.workers=1"])
    load_stage("guide").main(["soft", "--params", params, "--images", f"{out}/gray48/images.h5",
                              "--landmarks", f"{out}/landmarks/landmarks.h5", "--out", f"{out}/guides/soft.h5",
                              "--sheet", ""])


def fer_slice(fer_dir: Path, split: str = "train", per_class: int = 8, classes=None) -> tuple[np.ndarray, list[str]]:
    """The first `per_class` images (sorted names) of each class folder: uint8 [N,48,48] and labels."""
    images, labels = [], []
    for cls_dir in sorted((fer_dir / split).iterdir()):
        if classes and cls_dir.name not in classes:
            continue
        for f in sorted(cls_dir.iterdir())[:per_class]:
            images.append(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE))
            labels.append(cls_dir.name)
    return np.stack(images), labels


# ---- a throwaway copy of the project, for tests of DVC behaviour --------------------------------
import os
import subprocess
import sys

import yaml

VENV_BIN = str(Path(sys.executable).parent)


class Project:
    """A git + DVC copy of this checkout in a temp dir, with helpers to run dvc and edit params."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and res.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def dvc(self, *args: str, check: bool = True) -> str:
        res = self.run(sys.executable, "-m", "dvc", *args, check=check)
        return res.stdout + res.stderr

    def set_params(self, **changes) -> None:
        """set_params(**{"guides.soft.threshold": 50}) edits params.yaml in place (as a user before
        `dvc repro`; the next `dvc exp run` writes params.yaml from conf/ again)."""
        _edit_yaml(self.root / "params.yaml", changes)

    def set_conf(self, **changes) -> None:
        """Edit conf/config.yaml (what every `dvc exp run` composes params.yaml from) and write
        params.yaml from it, as the project's `python -m ferpipe.params` does."""
        from ferpipe.params import compose_params
        conf = self.root / "conf"
        _edit_yaml(conf / "config.yaml", changes)
        # the default recipe is applied over config.yaml: a key it sets (train.max_epochs...) is edited there too
        defaults = yaml.safe_load((conf / "config.yaml").read_text())["defaults"]
        recipe = conf / "recipe" / f"{next(d['recipe'] for d in defaults if isinstance(d, dict))}.yaml"
        text = recipe.read_text()
        data = yaml.safe_load(text)
        mine = {k: v for k, v in changes.items() if _has(data, k)}
        if mine:
            header = "".join(ln + "\n" for ln in text.splitlines() if ln.startswith("# @package"))
            for key, value in mine.items():
                *parents, last = key.split(".")
                node = data
                for part in parents:
                    node = node[part]
                node[last] = value
            recipe.write_text(header + yaml.safe_dump(data, sort_keys=False))
        (self.root / "params.yaml").write_text(compose_params(conf))

    def commit(self, msg: str = "update") -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", msg, "--allow-empty")


def _has(data: dict, key: str) -> bool:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _edit_yaml(path: Path, changes: dict) -> None:
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if last not in node:
            raise KeyError(f"{path.name} has no {key}")
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def ran_stages(output: str) -> list[str]:
    """Names of the stages a `dvc repro` / `dvc exp run` output says it ran."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def make_project(tmp: Path, **params) -> Project:
    """Copy the tracked and new (non-ignored) files of this checkout, small demo params (in conf/config.yaml
    and params.yaml: `dvc exp run` composes params.yaml from conf/), git commit."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    (tmp / "dvc.lock").unlink(missing_ok=True)
    proj = Project(tmp)
    proj.run("git", "init", "-q")
    proj.set_conf(**{"demo.train_per_class": 16, "demo.test_per_class": 6, "demo.sequences.per_class": 4,
                       "demo.sequences.frames": 4, "sequence.train.epochs": 5, "sequence.lstm.hidden": 16,
                       "sequence.cbm.hidden": 8, "sequence.cbm.depth": 5,
                       "train.max_epochs": 60, **params})  # DVC behaviour, not accuracy: a bounded training
    proj.commit("init")
    return proj


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory) -> Project:
    """The project after a full `dvc repro` on a small demo dataset (shared by the DVC tests)."""
    proj = make_project(tmp_path_factory.mktemp("project"))
    proj.first_repro = proj.dvc("repro")
    proj.commit("repro")
    return proj
