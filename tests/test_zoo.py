"""RMN's model zoo: parameter counts against the references, exact equivalence with the reference
network on stacked grayscale, weights files, CBAM/BAM, and one real training epoch per model."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import fer_slice
from ferpipe.models import MODEL_SPECS, ZOO_NAMES, build_model, count_params, get_head, replace_head
from ferpipe.models.attention import BAM, CBAM, _rename_pytorchcv
from ferpipe.models.backbones import load_weights, read_state_dict
from ferpipe.store import write_h5
from ferpipe.train.run import run_train
from ferpipe.tv import torchvision

tvm = torchvision.models
REPO = Path(__file__).resolve().parents[1]
C = 7

# torchvision's own constructor and the weights enum whose meta holds the published parameter count
# (ImageNet, 3-channel input, 1000 classes). GoogLeNet's published weights have no aux heads;
# Inception-v3's have AuxLogits, which the zoo model leaves out (subtracted below).
TORCHVISION = {
    "vgg19": (lambda: tvm.vgg19(), tvm.VGG19_Weights),
    "vgg19_bn": (lambda: tvm.vgg19_bn(), tvm.VGG19_BN_Weights),
    "efficientnet_b2": (lambda: tvm.efficientnet_b2(), tvm.EfficientNet_B2_Weights),
    "googlenet": (lambda: tvm.googlenet(aux_logits=False, init_weights=True), tvm.GoogLeNet_Weights),
    "resnet34": (lambda: tvm.resnet34(), tvm.ResNet34_Weights),
    "inception_v3": (lambda: tvm.inception_v3(init_weights=True), tvm.Inception_V3_Weights),
    "densenet121": (lambda: tvm.densenet121(), tvm.DenseNet121_Weights),
    "resnet152": (lambda: tvm.resnet152(), tvm.ResNet152_Weights),
}
# pytorchcv's counts (its _test() asserts in pytorchcv/models/cbamresnet.py and bamresnet.py), the
# models RMN trained; 3-channel input, 1000 classes
PYTORCHCV = {"cbam_resnet50": 28_089_624, "bam_resnet50": 25_915_099}
ATTENTION = tuple(PYTORCHCV)
assert set(TORCHVISION) | set(PYTORCHCV) == set(ZOO_NAMES)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta(build):
    with torch.device("meta"):
        return build()


def gray_and_head_delta(ref: nn.Module, ours: nn.Module, classes: int = C) -> int:
    """Parameters the zoo model has fewer than the reference: 2 of 3 stem input channels, the head
    resized from 1000 to `classes` outputs."""
    stem = ref.get_submodule(ours.stem_key.rpartition(".")[0])
    out_c, in_c, kh, kw = stem.weight.shape
    head = ref.get_submodule(ours.head_path)
    return out_c * (in_c - 1) * kh * kw + (head.in_features + 1) * (head.out_features - classes)


def reference_count(name: str) -> tuple[int, int]:
    """(the reference architecture's published count, the count the zoo model must have)."""
    ours = meta(lambda: build_model(name, C))
    if name in PYTORCHCV:
        ref = meta(lambda: tvm.resnet50())  # same stem and head as pytorchcv's ResNet-50s
        return PYTORCHCV[name], PYTORCHCV[name] - gray_and_head_delta(ref, ours)
    build, weights = TORCHVISION[name]
    ref = meta(build)
    published = weights.IMAGENET1K_V1.meta["num_params"]
    assert n_params(ref) == published, f"torchvision's {name} is not the published architecture"
    aux = sum(n_params(m) for p in getattr(ours, "drop_keys", ())
              if isinstance(m := getattr(ref, p.rstrip("."), None), nn.Module))
    return published, published - aux - gray_and_head_delta(ref, ours)


# ---------------------------------------------------------------- registry, sizes, parameter counts

def test_registry_entries():
    for name in ZOO_NAMES:
        spec = MODEL_SPECS[name]
        assert spec["family"] == "zoo" and spec["image"] == "gray48" and spec["guide"] is None
        assert spec["in_size"] == (75 if name == "inception_v3" else 48)
    with pytest.raises(ValueError, match="in_size >= 75"):
        build_model("inception_v3", C, in_size=48)
    model = meta(lambda: build_model("vgg19", C))
    with pytest.raises(ValueError, match="at least 32 px"):
        model(torch.zeros(1, 1, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 2, 48, 48, device="meta"))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_param_count_matches_the_reference(name):
    published, expected = reference_count(name)
    ours = meta(lambda: build_model(name, C))
    assert count_params(ours) == expected
    assert ours.stem_conv.in_channels == 1 and get_head(ours).out_features == C


def test_attention_counts_from_the_papers_structure():
    """pytorchcv's published counts = torchvision's ResNet-50 + CBAM / BAM blocks counted by hand."""
    def conv(cin, cout, k, bias=True):
        return cin * cout * k * k + (cout if bias else 0)

    def cbam(c, r=16):  # shared MLP (biases) + 7x7 conv without bias + BN(1)
        return conv(c, c // r, 1) + conv(c // r, c, 1) + conv(2, 1, 7, bias=False) + 2

    def bam(c, r=16):
        m = c // r
        channel = conv(c, m, 1) + 2 * m + conv(m, c, 1)
        spatial = conv(c, m, 1) + 2 * m + 2 * (conv(m, m, 3) + 2 * m) + conv(m, 1, 1)
        return channel + spatial

    resnet50 = n_params(meta(lambda: tvm.resnet50()))
    assert resnet50 == tvm.ResNet50_Weights.IMAGENET1K_V1.meta["num_params"] == 25_557_032
    widths, blocks = (256, 512, 1024, 2048), (3, 4, 6, 3)
    assert resnet50 + sum(n * cbam(w) for w, n in zip(widths, blocks)) == PYTORCHCV["cbam_resnet50"]
    assert resnet50 + sum(bam(w) for w in widths[:3]) == PYTORCHCV["bam_resnet50"]
    for name in ATTENTION:  # and the zoo models' extra modules are exactly these blocks
        ours = meta(lambda: build_model(name, 1000))
        extra = sum(n_params(m) for m in ours.modules() if isinstance(m, (CBAM, BAM)))
        assert extra == PYTORCHCV[name] - resnet50


def test_readme_table_matches_the_counts():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Model zoo"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    rows = {}
    for line in section.splitlines():
        cells = [c.strip(" `") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in ZOO_NAMES:
            rows[cells[0]] = (int(cells[1].replace(",", "")), int(cells[2].replace(",", "")))
    assert set(rows) == set(ZOO_NAMES)
    for name, (params, reference) in rows.items():
        published, expected = reference_count(name)
        assert (params, reference) == (expected, published), name


# ---------------------------------------------------------------- forward, backward, head

@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_backward_and_replace_head(name):
    torch.manual_seed(0)
    model = build_model(name, C).train()
    size = MODEL_SPECS[name]["in_size"]
    x = torch.rand(2, 1, size, size)
    out = model(x, None)
    assert out.shape == (2, C)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    replace_head(model, 3)
    after = model.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    assert changed == {model.head_path + ".weight", model.head_path + ".bias"}
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3) and model.num_classes == 3


def test_cbam_and_bam_bounds():
    """CBAM rescales by two sigmoids (0 <= out <= x for x >= 0); BAM by 1 + a sigmoid (x <= out <= 2x)."""
    torch.manual_seed(0)
    x = torch.rand(2, 32, 9, 9)
    with torch.no_grad():
        c = CBAM(32).eval()(x)
        b = BAM(32).eval()(x)
    assert c.shape == b.shape == x.shape
    assert (c >= 0).all() and (c <= x).all() and not torch.allclose(c, x)
    assert (b >= x).all() and (b <= 2 * x).all() and not torch.allclose(b, x)


# ---------------------------------------------------------------- weights files

def randomize_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that an equality of outputs says they were loaded."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@pytest.fixture(scope="module", params=tuple(TORCHVISION))
def tv_checkpoint(request, tmp_path_factory):
    """A torchvision model of the reference architecture (3 channels, 1000 classes, aux heads where
    torchvision builds them) saved as a plain state_dict, and its logits on stacked grayscale."""
    name = request.param
    torch.manual_seed(0)
    build = {"googlenet": lambda: tvm.googlenet(init_weights=True)}.get(name, TORCHVISION[name][0])
    ref = build()
    randomize_bn(ref)
    ref.eval()
    size = MODEL_SPECS[name]["in_size"]
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ref(x.expand(-1, 3, -1, -1))
    path = tmp_path_factory.mktemp(name) / f"tv_{name}.pth"
    torch.save(ref.state_dict(), path)
    return {"name": name, "path": path, "x": x, "logits": logits,
            "aux": sorted(k for k in ref.state_dict() if k.startswith(("aux1.", "aux2.", "AuxLogits.")))}


def test_torchvision_checkpoint_gives_the_reference_network_on_stacked_gray(tv_checkpoint):
    name = tv_checkpoint["name"]
    model = build_model(name, 1000)
    report = load_weights(model, tv_checkpoint["path"])
    assert [k for k, *_ in report["adapted"]] == [model.stem_key]
    assert sorted(k for k, _ in report["skipped"]) == tv_checkpoint["aux"]
    assert not report["missing"]
    with torch.no_grad():
        got = model.eval()(tv_checkpoint["x"])
    torch.testing.assert_close(got, tv_checkpoint["logits"], rtol=1e-4, atol=1e-4 * tv_checkpoint["logits"].abs().max())


def test_densenet_old_torchvision_key_names(tmp_path):
    """torchvision's DenseNet ImageNet files say denselayer1.norm.1 where the module has norm1."""
    torch.manual_seed(0)
    ref = tvm.densenet121()
    state = ref.state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "old.pth")
    model = build_model("densenet121", 1000)
    report = load_weights(model, tmp_path / "old.pth")
    assert not report["missing"] and len(report["loaded"]) + 1 == len(state)  # + the adapted stem
    torch.testing.assert_close(model.features.denseblock4.denselayer16.norm2.running_var,
                               ref.features.denseblock4.denselayer16.norm2.running_var)


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory) -> Path:
    """torchvision's ResNet-50 (3 channels, 1000 classes), wrapped as a training checkpoint is."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r50") / "r50.pth"
    torch.save({"state_dict": tvm.resnet50().state_dict()}, path)
    return path


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_body_from_a_torchvision_resnet50(name, resnet50_checkpoint):
    ref = torch.load(resnet50_checkpoint, weights_only=True)["state_dict"]
    model = build_model(name, C)
    report = load_weights(model, resnet50_checkpoint)
    attention = {k for k in model.state_dict() if ".cbam." in k or k.startswith("bam")}
    assert attention and set(report["missing"]) == attention | {"fc.weight", "fc.bias"}
    torch.testing.assert_close(model.layer3[4].conv2.weight, ref["layer3.4.conv2.weight"])
    torch.testing.assert_close(model.conv1.weight, ref["conv1.weight"].sum(1, keepdim=True))


def test_pytorchcv_key_names():
    """Names as pytorchcv's cbam_resnet50 / bam_resnet50 state_dicts have them (RMN's checkpoints)."""
    pairs = {
        "features.init_block.conv.conv.weight": "conv1.weight",
        "features.init_block.conv.bn.running_var": "bn1.running_var",
        "features.stage1.unit1.body.conv3.bn.weight": "layer1.0.bn3.weight",
        "features.stage1.unit1.identity_conv.conv.weight": "layer1.0.downsample.0.weight",
        "features.stage3.unit6.cbam.ch_gate.mlp.fc2.bias": "layer3.5.cbam.mlp.2.bias",
        "features.stage4.unit3.cbam.sp_gate.conv.bn.running_mean": "layer4.2.cbam.spatial.1.running_mean",
        "features.stage2.unit1.res_unit.body.conv2.conv.weight": "layer2.0.conv2.weight",
        "features.stage2.unit1.res_unit.identity_conv.bn.bias": "layer2.0.downsample.1.bias",
        "features.stage2.unit1.bam.ch_att.init_fc.bn.running_mean": "bam1.channel.1.running_mean",
        "features.stage3.unit1.bam.ch_att.final_fc.weight": "bam2.channel.3.weight",
        "features.stage4.unit1.bam.sp_att.dil_convs.conv2.bn.bias": "bam3.spatial.7.bias",
        "features.stage4.unit1.bam.sp_att.final_conv.bias": "bam3.spatial.9.bias",
        "output.weight": "fc.weight",
    }
    assert {k: _rename_pytorchcv(k) for k in pairs} == pairs


@pytest.mark.parametrize("name", ATTENTION)
def test_pytorchcv_checkpoint_gives_the_same_network(name, tmp_path):
    """Only where pytorchcv is installed (it is not a dependency): its model, our translation."""
    ptcv = pytest.importorskip(f"pytorchcv.models.{name.replace('_resnet50', 'resnet')}")
    torch.manual_seed(0)
    ref = getattr(ptcv, name)()
    randomize_bn(ref)
    ref.eval()
    torch.save({"net": ref.state_dict()}, tmp_path / "ptcv.pth")  # RMN's checkpoint wrapper
    model = build_model(name, 1000, in_size=224)
    report = load_weights(model, tmp_path / "ptcv.pth")
    assert not report["missing"] and not report["skipped"]
    x = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        want = ref(x.expand(-1, 3, -1, -1))
        torch.testing.assert_close(model.eval()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max())


# ---------------------------------------------------------------- one real training epoch per model

@pytest.fixture(scope="module")
def fer_artifacts(fer_dir, tmp_path_factory):
    """gray48.h5 + split.csv of a real FER-2013 slice: 4 images per class, 2 folds."""
    root = tmp_path_factory.mktemp("fer")
    images, labels = fer_slice(fer_dir, "train", per_class=4)
    classes = sorted(set(labels))
    n = len(labels)
    ids = np.array([f"fer{i:03d}" for i in range(n)])
    write_h5(root / "gray48.h5", {"images": images, "ids": ids})
    pd.DataFrame({"id": ids, "index": np.arange(n), "target": [classes.index(c) for c in labels],
                  "target_name": labels, "split": "train", "fold": np.arange(n) % 2}).to_csv(root / "split.csv",
                                                                                           index=False)
    return root


def train_one_epoch(name: str, weights: Path, fer_artifacts: Path, out: Path) -> None:
    """run_train (the train stage's code): one epoch of fold 0, initialized from a local weights file."""
    lr = 1e-4
    params = {"model": name, "task": "classes", "train": {
        "folds": [0], "max_epochs": 1, "batch_size": 7, "lr": lr, "threads": 1, "log_every": 0,
        "progress": False, "device": "cpu", "model_kwargs": {"weights_path": str(weights)}}}
    metrics = run_train(params, str(fer_artifacts / "split.csv"), str(fer_artifacts / "gray48.h5"),
                        str(fer_artifacts / "guides"), str(out / "models"), str(out / "train.json"), None)
    fold = metrics["folds"]["0"]
    assert fold["epochs"] == 1 and fold["train_rows"] == fold["val_rows"] == 14
    assert np.isfinite(fold["val_loss"]) and 0 <= fold["val_acc"] <= 1
    payload = torch.load(out / "models" / "fold0.pt", weights_only=True)
    assert payload["num_classes"] == C and "weights_path" not in payload["model_kwargs"]
    assert payload["meta"]["input"]["size"] == MODEL_SPECS[name]["in_size"]
    # trained from the file: two Adam steps move each weight by about lr; a fresh init is far away
    file_state, trained = read_state_dict(weights), payload["state_dict"]
    names = [k for k in trained if k in file_state and file_state[k].shape == trained[k].shape
             and k.endswith(("weight", "bias"))]
    assert len(names) > 10
    moved = max((trained[k] - file_state[k]).abs().max().item() for k in names)
    assert 0 < moved < 10 * lr


def test_one_epoch_on_fer2013_from_a_torchvision_file(tv_checkpoint, fer_artifacts, tmp_path):
    train_one_epoch(tv_checkpoint["name"], tv_checkpoint["path"], fer_artifacts, tmp_path)


@pytest.mark.parametrize("name", ATTENTION)
def test_one_epoch_on_fer2013_from_a_resnet50_file(name, resnet50_checkpoint, fer_artifacts, tmp_path):
    train_one_epoch(name, resnet50_checkpoint, fer_artifacts, tmp_path)
