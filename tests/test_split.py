import numpy as np
import pandas as pd
import pytest

from ferpipe.data.readers import read_folder
from ferpipe.data.split import make_split, run_split


@pytest.fixture(scope="module")
def fer_manifest(fer_dir):
    manifest, rejects = read_folder(str(fer_dir))
    assert len(rejects) == 0
    return manifest


def test_real_fer_polarity_split(fer_manifest):
    table, summary = make_split(fer_manifest, "polarity", folds=5, seed=2020)
    # surprise has no polarity: 31,865 - (3017 + 392) surprise images = 28,456 used
    n_surprise = int((fer_manifest["label_name"] == "surprise").sum())
    assert len(table) == len(fer_manifest) - n_surprise
    assert summary["excluded"] == {"no polarity target for this label": n_surprise}
    assert summary["classes"] == ["neutral", "positive", "negative"]
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    assert (test["fold"] == -1).all() and set(train["fold"]) == {0, 1, 2, 3, 4}
    assert len(test) == 3543 - 392
    assert not set(train["id"]) & set(test["id"])
    # test rows are exactly the dataset's own test folder
    assert all(i.startswith("test/") for i in test["id"])
    # stratified: each fold's class shares within 1 point of the overall shares
    overall = train["target"].value_counts(normalize=True)
    for _, fold in train.groupby("fold"):
        share = fold["target"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.01
    # happy -> positive, neutral -> neutral, angry/sad/... -> negative
    names = fer_manifest.set_index("id").loc[table["id"], "label_name"].to_numpy()
    assert set(table["target"][names == "happy"]) == {1}
    assert set(table["target"][names == "neutral"]) == {0}
    assert set(table["target"][np.isin(names, ["angry", "disgust", "fear", "sad"])]) == {2}
    # index points back at the manifest row
    assert (fer_manifest["id"].to_numpy()[table["index"]] == table["id"].to_numpy()).all()


def test_classes_task_and_determinism(fer_manifest):
    a, sa = make_split(fer_manifest, "classes", folds=5, seed=2020)
    b, _ = make_split(fer_manifest, "classes", folds=5, seed=2020)
    c, _ = make_split(fer_manifest, "classes", folds=5, seed=7)
    assert sa["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert len(a) == len(fer_manifest)
    pd.testing.assert_frame_equal(a, b)
    assert not (a["fold"] == c["fold"]).all()


def _toy(n_subjects=10, per=6):
    rows = []
    for s in range(n_subjects):
        for k in range(per):
            rows.append({"id": f"S{s:03d}_{k}", "split": "train", "label_name": ["happy", "sad", "angry"][k % 3],
                         "valence": np.nan, "arousal": np.nan, "subject": f"S{s:03d}"})
    return pd.DataFrame(rows)


def test_subject_independent_folds():
    table, summary = make_split(_toy(), "classes", folds=5, seed=1)
    assert summary["subject_independent"]
    subj = table["id"].str[:4]
    assert (table.groupby(subj)["fold"].nunique() == 1).all()


def test_valence_arousal_and_errors(tmp_path):
    m = _toy()
    m["subject"] = ""
    m["valence"] = np.linspace(-1, 1, len(m))
    m["arousal"] = 0.5
    m.loc[0, "arousal"] = np.nan
    table, summary = make_split(m, "valence_arousal", folds=3)
    assert len(table) == len(m) - 1 and summary["excluded"] == {"no valence/arousal": 1}
    with pytest.raises(ValueError, match="unknown task"):
        make_split(m, "age")
    with pytest.raises(ValueError, match="fewer than 5"):
        make_split(_toy(2, 6).assign(subject=""), "classes", folds=5)
    m.to_csv(tmp_path / "m.csv", index=False)
    run_split(str(tmp_path / "m.csv"), str(tmp_path / "s.csv"), str(tmp_path / "s.json"), "valence_arousal", folds=3)
    assert pd.read_csv(tmp_path / "s.csv")["valence"].notna().all()


def test_guided_st_folds_are_kept_on_real_fer(fer_dir, tmp_path):
    """Guided-ST's distribution CSVs carry their folds: split keeps them (numbered 0..k-1 in their order)
    so their 5-fold results can be reproduced; split.dataset_folds=false draws new ones. Their AffectNet
    layout (`path;emotion;fold`, no in_set) reads as training rows."""
    from ferpipe.data.readers import read_dataset

    polarity = {"neutral": 0, "happy": 1, "sad": 2, "angry": 2}
    rows = []
    for split, per in (("train", 15), ("test", 3)):
        for cls, code in polarity.items():
            for i, f in enumerate(sorted((fer_dir / split / cls).iterdir())[:per]):
                rows.append((code, f"{split}/{cls}/{f.name}", split, (i % 3) * 2 + 1 if split == "train" else ""))
    fer_csv = tmp_path / "fer_dist.csv"
    fer_csv.write_text("emotion;path;in_set;fold\n" + "".join(f"{e};{p};{s};{k}\n" for e, p, s, k in rows))
    man, rej = read_dataset("guided_st", fer_csv, root=str(fer_dir))
    assert rej.empty and len(man) == len(rows)
    table, summary = make_split(man, "polarity", folds=5, seed=2020)
    train = table[table["split"] == "train"]
    given = man.set_index("id").loc[train["id"], "fold"].to_numpy()
    assert summary["fold_source"] == "dataset" and summary["folds"] == 3
    assert (train["fold"].to_numpy() == (given - 1) // 2).all()                       # 1, 3, 5 -> 0, 1, 2
    assert (table.loc[table["split"] == "test", "fold"] == -1).all()
    drawn, s2 = make_split(man, "polarity", folds=5, seed=2020, dataset_folds=False)
    assert s2["fold_source"] == "drawn" and set(drawn.loc[drawn["split"] == "train", "fold"]) == set(range(5))
    partial = man.copy()
    partial.loc[partial.index[0], "fold"] = -1                                         # one row without a fold
    assert make_split(partial, "polarity", folds=5, seed=2020)[1]["fold_source"] == "drawn"

    aff_csv = tmp_path / "affectnet_dist.csv"                                          # their AffectNet file
    aff_csv.write_text("path;emotion;fold\n" + "".join(f"{p};{e};{k}\n" for e, p, s, k in rows if s == "train"))
    aff, rej = read_dataset("guided_st", aff_csv, root=str(fer_dir))
    assert rej.empty and (aff["split"] == "train").all() and sorted(set(aff["fold"])) == [1, 3, 5]
    assert make_split(aff, "polarity", folds=5, seed=2020, test=())[1]["fold_source"] == "dataset"
