"""Models: registry, shapes, exact parameter counts, STN behaviour, weights loading, heads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ferpipe.models import (
    MODEL_NAMES,
    MODEL_SPECS,
    RMN,
    STN,
    Localization,
    MaskingBlock,
    SimpleCNN,
    build_model,
    count_params,
    get_head,
    needs_guide,
    replace_head,
    resnet18,
)
from ferpipe.models.backbones import adapt_conv_weight, load_weights
from ferpipe.tv import torchvision

C = 7
# the zoo (RMN's benchmark models) has its own tests, tests/test_zoo.py: big ImageNet networks
CORE_NAMES = tuple(n for n in MODEL_NAMES if MODEL_SPECS[n]["family"] != "zoo")


def batch(n=2, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


@pytest.fixture(scope="module")
def rmn48():
    torch.manual_seed(0)
    return build_model("rmn", C)  # in_size 48 -> small stem


@pytest.fixture(scope="module")
def rmn224():
    torch.manual_seed(0)
    return build_model("rmn", C, in_size=224)  # standard ImageNet stem, 3-channel conv1


def make(name, rmn48):
    if name == "rmn":
        rmn48.zero_grad(set_to_none=True)
        return rmn48
    torch.manual_seed(0)
    return build_model(name, C)


# ---------------------------------------------------------------- registry

def test_registry_names_and_inputs():
    assert set(CORE_NAMES) == {"baseline", "original", "landmarks", "soft", "dilation", "saliency",
                               "patches", "weighted", "rmn", "resnet18", "vgg"}
    for name in ("landmarks", "soft", "dilation", "saliency"):
        assert MODEL_SPECS[name]["image"] == "gray48" and MODEL_SPECS[name]["guide"] == name
    for name in ("patches", "weighted"):
        assert MODEL_SPECS[name]["image"] == name and MODEL_SPECS[name]["guide"] == "landmarks"
    for name in ("baseline", "original", "rmn", "resnet18", "vgg"):
        assert MODEL_SPECS[name]["image"] == "gray48" and MODEL_SPECS[name]["guide"] is None
        assert not needs_guide(name)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", C)


def test_guided_names_are_guided_stns():
    for name in MODEL_NAMES:
        if MODEL_SPECS[name]["stn_mode"] is not None:
            model = build_model(name, 3)
            assert isinstance(model, STN) and model.mode == MODEL_SPECS[name]["stn_mode"]
            assert (model.mode == "guided") == needs_guide(name)


# ---------------------------------------------------------------- shapes + backward, every model

@pytest.mark.parametrize("name", CORE_NAMES)
def test_forward_shape_and_backward(name, rmn48):
    model = make(name, rmn48).train()
    x = batch()
    guide = batch(seed=1) if needs_guide(name) else None
    out = model(x, guide)
    assert out.shape == (2, C)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_rmn_other_sizes(rmn48, rmn224):
    assert rmn48.stem == "small" and rmn224.stem == "standard"
    with torch.no_grad():
        assert rmn48.eval()(batch(1, 64)).shape == (1, C)   # small stem: stages at 64/32/16/8 px
        assert rmn224.eval()(batch(1, 224)).shape == (1, C)  # standard stem: 56/28/14/7 px
        assert rmn224(batch(1, 50)).shape == (1, C)          # odd maps 13/7/4/2 px inside the U-Nets


@pytest.mark.parametrize("size", [1, 3, 5, 8])
def test_masking_block_any_size_softmax_over_channels(size):
    torch.manual_seed(0)
    block = MaskingBlock(4, depth=4).eval()
    x = torch.randn(2, 4, size, size)
    with torch.no_grad():
        m = block(x)
    assert m.shape == x.shape
    torch.testing.assert_close(m.sum(1), torch.ones(2, size, size))
    assert (m >= 0).all()


# ---------------------------------------------------------------- exact parameter counts

def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def linear(cin, cout):
    return cin * cout + cout


def test_param_counts_deep_emotion():
    simple = (conv(1, 10, 3)              # 1*10*9 + 10 = 100
              + 3 * conv(10, 10, 3)       # 3 * (10*10*9 + 10) = 2730
              + 2 * 10                    # BatchNorm2d(10): weight + bias
              + linear(810, 50)           # 810*50 + 50 = 40550
              + linear(50, C))            # 50*7 + 7 = 357
    assert simple == 43757
    loc = (conv(1, 8, 7)                  # 1*8*49 + 8 = 400
           + conv(8, 10, 5)               # 8*10*25 + 10 = 2010
           + linear(640, 32)              # 640*32 + 32 = 20512
           + linear(32, 6))               # 32*6 + 6 = 198
    assert loc == 23120
    assert count_params(SimpleCNN(C)) == simple
    assert count_params(Localization()) == loc
    assert count_params(STN(C, "original")) == simple + loc == 66877
    assert count_params(STN(C, "guided")) == simple + loc
    assert SimpleCNN(C).features_dim == 810 and Localization().features_dim == 640


def basic_block(cin, cout):
    """BasicBlock at stride 1 with a 1x1 conv + BN shortcut when widths differ (BN = 2 per channel)."""
    n = conv(cin, cout, 3, False) + 2 * cout + conv(cout, cout, 3, False) + 2 * cout
    return n + (conv(cin, cout, 1, False) + 2 * cout if cin != cout else 0)


def test_param_count_rmn(rmn48, rmn224):
    def mask(c, depth):
        w = [c * 2 ** i for i in range(depth + 1)]
        n = sum(basic_block(w[i], w[i + 1]) for i in range(depth))                   # encoder
        n += sum(conv(w[i + 1], w[i], 2) + 2 * w[i] + basic_block(w[i + 1], w[i])     # decoder
                 for i in range(1, depth))
        return n + basic_block(w[1], w[0])                                           # last block
    resnet34 = 21797672 - linear(512, 1000)   # torchvision resnet34 without its head
    assert count_params(torchvision.models.resnet34()) == 21797672
    masks = mask(64, 4) + mask(128, 3) + mask(256, 2) + mask(512, 1)
    standard = resnet34 + masks + linear(512, C)
    assert standard == 137_796_423
    assert count_params(rmn224) == standard
    # small stem: conv1 3x3 (3 in) instead of 7x7 (3 in)
    assert count_params(rmn48) == standard - conv(3, 64, 7, False) + conv(3, 64, 3, False)


def test_param_count_resnet18():
    tv18 = count_params(torchvision.models.resnet18())  # 11,689,512 with 1000 classes
    expected = tv18 - conv(3, 64, 7, False) + conv(1, 64, 3, False) - linear(512, 1000) + linear(512, C)
    assert count_params(resnet18(C)) == expected == 11_171_271


def test_param_count_vgg():
    def block(cin, cout):  # two 3x3 convs without bias, each with BatchNorm (weight + bias)
        return conv(cin, cout, 3, False) + 2 * cout + conv(cout, cout, 3, False) + 2 * cout
    assert count_params(build_model("vgg", C)) == (
        block(1, 24) + block(24, 48) + block(48, 96) + block(96, 192) + linear(192, C)) == 661_375
    small = build_model("vgg", 3, width=8, blocks=3)
    assert count_params(small) == block(1, 8) + block(8, 16) + block(16, 32) + linear(32, 3)
    with torch.no_grad():  # global pooling: any input side the pools can halve
        assert small.eval()(batch(2, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="image must be"):
        small(torch.zeros(2, 3, 48, 48))


def test_vgg_channels_last_gives_the_same_output_as_contiguous():
    torch.manual_seed(0)
    model = build_model("vgg", C).eval()
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = batch(4)
    with torch.no_grad():
        ref = model(x)
        plain = build_model("vgg", C).eval()
        plain.load_state_dict(model.state_dict())
        plain.to(memory_format=torch.contiguous_format)
        plain.forward = lambda x, guide=None: plain.head(plain.dropout(torch.flatten(plain.pool(plain.features(x)), 1)))
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- STN behaviour

def test_stn_identity_at_init_equals_simple_cnn():
    torch.manual_seed(0)
    cnn = SimpleCNN(C).eval()
    x = batch(4)
    for mode in ("original", "guided"):
        stn = STN(C, mode).eval()
        stn.classifier.load_state_dict(cnn.state_dict())
        guide = batch(4, seed=3) if mode == "guided" else None
        theta = stn.theta(x, guide)
        torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3))
        torch.testing.assert_close(stn.warp(x, guide), x, atol=1e-5, rtol=0)  # float rounding only
        with torch.no_grad():
            torch.testing.assert_close(stn(x, guide), cnn(x), atol=1e-5, rtol=1e-5)


def test_stn_theta_bound_keeps_the_window_on_the_image():
    """theta_bound: the identity (and its gradient) at initialization, each entry within the bound of the
    identity whatever the localization net outputs; 0 = unbounded (Guided-ST); the same state_dict."""
    torch.manual_seed(0)
    x, guide = batch(4), batch(4, seed=3)
    free, bounded = STN(C, "guided").eval(), STN(C, "guided", theta_bound=0.5).eval()  # eval: no dropout
    bounded.load_state_dict(free.state_dict())                       # no new weights or buffers
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(bounded.theta(x, guide), eye.expand(4, 2, 3))
    for net in (free, bounded):                                      # the same first gradient
        net.zero_grad()
        net(x, guide).sum().backward()
    torch.testing.assert_close(bounded.localization.fc_loc[2].bias.grad, free.localization.fc_loc[2].bias.grad)
    with torch.no_grad():                                            # a runaway: translation 8 widths, zoom 40x
        for net in (free, bounded):
            net.localization.fc_loc[2].bias.copy_(torch.tensor([40.0, 3, -8, -2, 40, 8]))
    assert free.theta(x, guide).abs().max() == 40 and ((bounded.theta(x, guide) - eye).abs() <= 0.5).all()
    with torch.no_grad():                                            # the runaway seen on FER-2013: 8 widths off
        for net in (free, bounded):
            net.localization.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, -8, 0, 1, 8]))
    theta = bounded.theta(x, guide)
    assert ((theta - eye).abs() <= 0.5).all() and ((theta - eye).abs() > 0.49).any()
    warped = bounded.warp(x, guide)
    assert (warped.abs() > 0).float().mean() > 0.2                   # it still sees the image, not only padding
    assert (free.warp(x, guide) == 0).all()                          # unbounded: only zero padding
    with pytest.raises(ValueError, match="bound"):
        Localization(48, bound=-1)


@pytest.mark.parametrize("factory", [lambda: SimpleCNN(C), lambda: STN(C, "original")])
def test_dropout_off_in_eval_on_in_train(factory):
    torch.manual_seed(0)
    model = factory()
    x = batch(8)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_guided_mode_needs_a_guide():
    stn = STN(C, "guided")
    with pytest.raises(ValueError, match="guide"):
        stn(batch())
    with pytest.raises(ValueError, match="guide"):
        stn(batch(), batch(3))  # batch mismatch
    with pytest.raises(ValueError):
        stn(batch(2, 40), batch(2, 40))  # wrong size


def test_guide_is_used_only_in_guided_mode():
    torch.manual_seed(0)
    x, g1, g2 = batch(), batch(seed=1), batch(seed=2)
    stns = {}
    for mode in ("guided", "original"):
        stn = stns[mode] = STN(C, mode).eval()
        with torch.no_grad():
            stn.localization.fc_loc[2].weight.normal_(0, 0.1)
            a, b = stn(x, g1), stn(x, g2)
        assert torch.equal(a, b) == (mode == "original"), mode
    # in guided mode the image is what gets sampled: same guide, other image -> other output
    with torch.no_grad():
        guided = stns["guided"]
        assert not torch.equal(guided(batch(seed=5), g1), guided(x, g1))
        # and the transform is no longer the identity
        assert not torch.allclose(guided.warp(x, g1), x)


# ---------------------------------------------------------------- weights loading

def test_resnet18_round_trip_from_file(tmp_path):
    torch.manual_seed(0)
    src = resnet18(C).eval()
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    dst = resnet18(C, weights_path=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(batch()), src(batch()))


def test_resnet18_from_torchvision_checkpoint(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()  # 3-channel 7x7 conv1, 1000 classes
    path = tmp_path / "tv_r18.pth"
    torch.save(tv.state_dict(), path)
    model = resnet18(3)
    fresh_fc = model.fc.weight.detach().clone()
    report = load_weights(model, path)
    assert [k for k, *_ in report["adapted"]] == ["conv1.weight"]
    assert {k for k, _ in report["skipped"]} == {"fc.weight", "fc.bias"}
    assert set(report["missing"]) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(model.conv1.weight, adapt_conv_weight(tv.conv1.weight, (64, 1, 3, 3)))
    torch.testing.assert_close(model.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    torch.testing.assert_close(model.bn1.running_var, tv.bn1.running_var)
    assert torch.equal(model.fc.weight, fresh_fc)
    assert resnet18(3, weights_path=path)(batch()).shape == (2, 3)


def test_adapt_conv_weight_keeps_flat_response():
    w = torch.ones(2, 3, 7, 7)
    a = adapt_conv_weight(w, (2, 1, 3, 3))
    assert a.shape == (2, 1, 3, 3)
    torch.testing.assert_close(a.sum((1, 2, 3)), w.sum((1, 2, 3)))  # 3*49 per filter


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        resnet18(C, weights_path=tmp_path / "nowhere.pt")
    path = tmp_path / "cnn.pt"
    torch.save(SimpleCNN(C).state_dict(), path)
    with pytest.raises(ValueError):
        resnet18(C, weights_path=path)


def test_transfer_between_label_sets(tmp_path):
    torch.manual_seed(0)
    src = STN(3, "guided")
    path = tmp_path / "stn3.pt"
    torch.save(src.state_dict(), path)
    dst = STN(7, "guided")
    report = load_weights(dst, path)
    assert set(report["missing"]) == {"classifier.fc2.weight", "classifier.fc2.bias"}
    torch.testing.assert_close(dst.classifier.fc1.weight, src.classifier.fc1.weight)
    torch.testing.assert_close(dst.localization.fc_loc[0].weight, src.localization.fc_loc[0].weight)


def test_rmn_body_from_torchvision_resnet34(tmp_path, rmn224):
    torch.manual_seed(1)
    tv = torchvision.models.resnet34()
    path = tmp_path / "tv_r34.pth"
    torch.save(tv.state_dict(), path)
    report = load_weights(rmn224, path, allow_missing=("mask",))
    assert not report["adapted"]
    assert all(k.startswith(("mask", "fc.")) for k in report["missing"])
    torch.testing.assert_close(rmn224.layer4[2].conv1.weight, tv.layer4[2].conv1.weight)


# ---------------------------------------------------------------- heads

@pytest.mark.parametrize("name", CORE_NAMES)
def test_replace_head_keeps_other_weights(name, rmn48):
    if name == "rmn":  # a cheap-to-run variant: standard stem at 48 px, 1-channel conv1
        torch.manual_seed(0)
        model = build_model("rmn", C, stem="standard", in_channels=1)
        assert model.conv1.in_channels == 1
    else:
        model = make(name, rmn48)
    head = get_head(model)
    assert head.out_features == C
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_head(model, 3)
    assert get_head(model).out_features == 3 and model.num_classes == 3
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(model.head_path + ".") for k in changed), changed
    guide = batch(seed=1) if needs_guide(name) else None
    with torch.no_grad():
        assert model.eval()(batch(), guide).shape == (2, 3)
    del model


def test_replace_head_fallback_last_linear():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    replace_head(model, 2)
    assert model[3].out_features == 2 and model[1].out_features == 8


@pytest.fixture(scope="module")
def real_faces(fer_dir):
    """16 real FER-2013 PublicTest faces (uint8 [16, 48, 48]) and their saliency guide maps."""
    import cv2

    from ferpipe.guides.maps import make_guide
    files = [f for c in ("angry", "happy", "sad", "surprise") for f in sorted((fer_dir / "test" / c).iterdir())[:4]]
    images = np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files])
    return images, make_guide("saliency", images, None)


# every family: Deep-Emotion plain / STN / guided STN, CompactVGG and torchvision's VGG (Conv-BN pairs in a
# Sequential: folded), ResNet (BN outside Sequentials: layout only); the other zoo models are built from the same
# torchvision blocks (all 21 passed once: 150 s, too slow for every CI run)
@pytest.mark.parametrize("name", ["baseline", "original", "soft", "vgg", "vgg19_bn", "resnet18"])
def test_inference_model_computes_the_same_function(real_faces, name):
    """The prediction paths' form of a model (BatchNorm folded, channels_last) gives the eval model's outputs on
    real faces, with trained-looking batch-norm statistics (not the identity ones of a fresh model)."""
    from ferpipe.models.inference import inference_model
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    images, guides = real_faces
    size = MODEL_SPECS[name]["in_size"]
    x = torch.nn.functional.interpolate(torch.from_numpy(images[:, None]).float() / 255, size=(size, size))
    g = (torch.nn.functional.interpolate(torch.from_numpy(guides[:, None]).float() / 255, size=(size, size))
         if MODEL_SPECS[name]["guide"] else None)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fast = inference_model(model)
    folds = [m for m in model.modules() if isinstance(m, nn.Sequential)
             and any(isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) for a, b in zip(m, list(m)[1:]))]
    if folds:  # every Conv2d -> BatchNorm2d pair of a Sequential is gone
        assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) < n_bn
    convs = [m.weight for m in fast.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1
             and m.weight.shape[-1] > 1]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with torch.inference_mode():
        want, got = model(x, g), fast(x, g)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # a copy: the model is untouched
