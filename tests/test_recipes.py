"""Recipes and params.yaml: conf/config.yaml + conf/recipe/<name>.yaml composed by DVC's Hydra (no DVC run here;
the `dvc exp run` behaviour is tested in test_pipeline_train.py)."""
from pathlib import Path

import pytest
import yaml

from conftest import REPO, load_stage
from ferpipe.evaluate.run import resolve_params as resolve_evaluate
from ferpipe.models import build_model
from ferpipe.params import compose_params
from ferpipe.train.run import resolve_params as resolve_train

CONF = REPO / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def test_committed_params_yaml_is_the_composition():
    """params.yaml is what `dvc exp run` writes from conf/ (edit conf/config.yaml, then python -m ferpipe.params)."""
    assert (REPO / "params.yaml").read_text() == compose_params(CONF)


def test_the_dvc_project_composes_params_with_hydra():
    cfg = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in cfg and "enabled = True" in cfg


def test_recipes_exist_and_set_only_known_keys():
    assert {"quick", "cpu60", "paper", "bundled"} <= set(RECIPES)
    base = dict(_leaves({k: v for k, v in yaml.safe_load((CONF / "config.yaml").read_text()).items()
                         if k != "defaults"}))
    for name in RECIPES:
        text = (CONF / "recipe" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name  # keys are top-level params, not recipe.*
        recipe = yaml.safe_load(text)
        assert recipe["recipe"] == name
        for key, _ in _leaves(recipe):
            # a misspelt key would silently become a new param that no stage reads
            assert key in base or key.startswith("train.model_kwargs."), f"{name}: {key} is not in conf/config.yaml"
        assert not set(recipe) & {"dataset", "sequence"}, f"{name}: the data stays the user's"


@pytest.fixture(scope="module")
def fer_tiny(fer_dir, tmp_path_factory):
    """8 real FER-2013 faces in the Kaggle layout (train and test, two classes)."""
    root = tmp_path_factory.mktemp("tiny")
    for split in ("train", "test"):
        for cls in ("happy", "sad"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((fer_dir / split / cls).iterdir())[:2]:
                (root / split / cls / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_composes_to_params_the_stages_accept(name, fer_tiny, tmp_path):
    """A recipe's params pass every check of the stages: the train and evaluate params, its model with its kwargs,
    and the preprocessing stage scripts themselves on 8 real faces (a recipe's landmarks.passes [] once stopped the
    landmarks stage of `dvc exp run -S recipe=quick`)."""
    text = compose_params(CONF, [f"recipe={name}"])
    params = yaml.safe_load(text)
    assert params["recipe"] == name
    train = resolve_train(params["train"])                     # no unknown train key
    resolve_evaluate(params["evaluate"])
    n = 7 if params["task"] == "classes" else 3
    build_model(params["model"], n, **train["model_kwargs"])   # the recipe's model takes its kwargs
    (tmp_path / "params.yaml").write_text(text)
    d = tmp_path / "run"
    prm = ["--params", str(tmp_path / "params.yaml")]
    load_stage("ingest").main(prm + ["-S", "dataset.format=folder", "-S", f"dataset.path={fer_tiny}",
                                     "-S", "ingest.workers=1", "--out", f"{d}/i.h5", "--manifest", f"{d}/m.csv",
                                     "--rejects", f"{d}/r.csv", "--metrics", f"{d}/i.json", "--sheet", "", "--quiet"])
    load_stage("gray48").main(prm + ["--images", f"{d}/i.h5", "--out", f"{d}/g.h5", "--sheet", ""])
    load_stage("landmarks").main(prm + ["--images", f"{d}/i.h5", "--out", f"{d}/l.h5", "--metrics", "", "--sheet", "",
                                        "-S", "landmarks.workers=1"])
    load_stage("split").main(prm + ["--manifest", f"{d}/m.csv", "--out", f"{d}/s.csv", "--summary", f"{d}/s.json",
                                    "-S", "split.folds=2"])
    assert (d / "s.csv").is_file()


def test_recipe_values():
    p = {r: yaml.safe_load(compose_params(CONF, [f"recipe={r}"])) for r in ("quick", "cpu60", "paper", "bundled")}
    paper = p["paper"]["train"]
    assert (p["paper"]["task"], paper["folds"], paper["max_epochs"], paper["patience"], paper["lr"],
            paper["lr_schedule"], paper["class_weights"], paper["batch_size"]) == (
        "polarity", "all", 500, 30, 0.001, "constant", True, 128)
    assert paper["select"] == "balanced_accuracy"  # the one change from Guided-ST (README: Runs that never learn)
    for r in ("quick", "cpu60", "bundled"):
        t = p[r]["train"]
        assert (p[r]["model"], p[r]["task"], t["folds"], t["final"], t["lr_schedule"], t["class_weights"],
                t["patience"]) == ("vgg", "classes", "none", True, "cosine", False, 0), r
    assert p["cpu60"]["train"]["max_epochs"] == 40 and p["cpu60"]["evaluate"]["tta"] == 10
    assert p["cpu60"]["train"]["model_kwargs"] == {"channels": [16, 32, 96, 192], "convs": [1, 2, 2, 2]}
    assert p["bundled"]["train"]["max_epochs"] == 60 and p["bundled"]["evaluate"]["tta"] == 10
    assert p["bundled"]["train"]["model_kwargs"] == {"width": 24}
    assert p["quick"]["train"]["max_epochs"] <= 3
    rmn = yaml.safe_load(compose_params(CONF, ["recipe=rmn"]))  # their configs/fer2013_config.json
    t = rmn["train"]
    assert (rmn["model"], rmn["task"], t["optimizer"], t["lr"], t["weight_decay"], t["batch_size"], t["max_epochs"],
            t["lr_schedule"], t["plateau_patience"], t["patience"], t["class_weights"], t["model_kwargs"]["in_size"],
            t["augment"]["degrees"], t["augment"]["hflip"]) == (
        "rmn", "classes", "radam", 1e-4, 1e-3, 48, 50, "plateau", 2, 9, False, 224, 30, 0.5)
    # the default is the paper recipe; a recipe never changes where the data is
    default = yaml.safe_load(compose_params(CONF))
    assert default == p["paper"]
    assert all(v["dataset"] == default["dataset"] and v["sequence"] == default["sequence"] for v in p.values())


def test_overrides_apply_after_the_recipe_and_typos_fail():
    p = yaml.safe_load(compose_params(CONF, ["recipe=cpu60", "train.max_epochs=2", "dataset.path=/data/fer"]))
    assert p["train"]["max_epochs"] == 2 and p["model"] == "vgg" and p["dataset"]["path"] == "/data/fer"
    with pytest.raises(Exception, match="max_epoch"):
        compose_params(CONF, ["train.max_epoch=2"])          # a misspelt key is an error, not a new param
    with pytest.raises(Exception, match="cpu61"):
        compose_params(CONF, ["recipe=cpu61"])


def test_composed_text_changes_one_line_per_changed_value():
    """What `dvc exp run -S train.lr=0.002` writes differs from params.yaml in that line only."""
    old = (REPO / "params.yaml").read_text().splitlines()
    new = compose_params(CONF, ["train.lr=0.002"]).splitlines()
    assert len(old) == len(new)
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert changed == [("  lr: 0.001", "  lr: 0.002")], changed


def test_guideless_recipes_skip_face_detection_and_guided_models_then_refuse(fer_dir, tmp_path):
    """quick / cpu60 / bundled train a model without a guide map, so they turn the images' landmark detection off
    (28 min of the 2-core CPU on FER-2013) and leave the sequence frames' passes alone; on real FER-2013 faces the
    landmarks stage then finds no face, and a guided model trained on such guides stops with a one-line error."""
    from conftest import fer_slice
    from ferpipe.guides.maps import run_guide
    from ferpipe.faces.landmarks import run_landmarks
    from ferpipe.store import read_h5, write_h5
    from ferpipe.models.inputs import InputSpec
    from ferpipe.data.tensors import check_guides_found_faces

    base = yaml.safe_load(compose_params(CONF))
    for name in ("quick", "cpu60", "bundled"):
        p = yaml.safe_load(compose_params(CONF, [f"recipe={name}"]))
        assert p["landmarks"]["passes"] == [] and p["model"] == "vgg", name
        assert p["sequence"]["landmarks_passes"] == base["sequence"]["landmarks_passes"] == base["landmarks"]["passes"]
    images, _ = fer_slice(fer_dir, per_class=2)
    ids = [f"im{i}" for i in range(len(images))]
    write_h5(tmp_path / "gray48.h5", {"images": images, "ids": ids}, {"stage": "gray48", "size": 48})
    for passes in ([], ["dlib"]):
        d = tmp_path / f"p{len(passes)}"
        d.mkdir()
        summary = run_landmarks(str(tmp_path / "gray48.h5"), str(d / "lm.h5"), None, None, passes=passes, workers=1)
        found = read_h5(d / "lm.h5", ["found"])["found"]
        assert (not found.any()) if not passes else found.mean() > 0.5, summary
        run_guide("soft", str(tmp_path / "gray48.h5"), str(d / "lm.h5"), str(d / "soft.h5"))
        spec = InputSpec(image="gray48", guide="soft", size=48, mean=[0, 0], std=[1, 1])
        if passes:
            check_guides_found_faces(spec, d)
        else:
            with pytest.raises(ValueError, match="without face detection.*landmarks.passes"):
                check_guides_found_faces(spec, d)
    check_guides_found_faces(InputSpec(image="gray48", guide=None, size=48, mean=[0], std=[1]), tmp_path / "p0")
