import hashlib

import pytest
import torch
import torchvision
from torch import nn

from wbs_dist.errors import ConfigError, UsageError
from wbs_dist.train.models import (
    AUX_LOSS_WEIGHT,
    MODELS,
    _adapted_conv,
    build_model,
    count_parameters,
    flops_per_sample,
    split_logits,
    weights_file,
    weights_url,
)

SMALL = {"inception_v3": (80, 80)}  # inception_v3 needs >= 75 px; the others run at 96 x 64


def first_conv(model, name):
    return {
        "resnet50": lambda m: m.conv1,
        "resnet18": lambda m: m.conv1,
        "inception_v3": lambda m: m.Conv2d_1a_3x3.conv,
        "vgg16": lambda m: m.features[0],
        "densenet169": lambda m: m.features.conv0,
    }[name](model)


@pytest.mark.parametrize("in_channels", [2, 3])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_one_logit(name, in_channels):
    size = SMALL.get(name, (96, 64))
    model = build_model(name, in_channels, input_size=size).train()
    assert first_conv(model, name).in_channels == in_channels
    x = torch.randn(2, in_channels, *size)
    main, aux = split_logits(model(x))
    assert main.shape == (2, 1) and aux is None
    nn.functional.binary_cross_entropy_with_logits(main, torch.tensor([[1.0], [0.0]])).backward()
    assert first_conv(model, name).weight.grad is not None


def test_inception_aux_logits_at_299():
    model = build_model("inception_v3", 2, input_size=(299, 299)).train()
    with torch.no_grad():
        main, aux = split_logits(model(torch.randn(2, 2, 299, 299)))
        assert main.shape == (2, 1) and aux.shape == (2, 1)
        y = torch.ones(2, 1)
        bce = nn.functional.binary_cross_entropy_with_logits
        assert torch.isfinite(bce(main, y) + AUX_LOSS_WEIGHT * bce(aux, y))
        # the auxiliary head only runs in training, so evaluation takes any size >= 75 px
        assert model.eval()(torch.randn(1, 2, 80, 80)).shape == (1, 1)
        with pytest.raises(UsageError, match="299 x 299"):
            model.train()(torch.randn(2, 2, 96, 96))


def test_inception_aux_off_below_299_and_minimum_size():
    assert build_model("inception_v3", 3, input_size=(512, 256)).AuxLogits is None
    assert build_model("inception_v3", 3).AuxLogits is None
    with pytest.raises(ConfigError, match="'train_size'"):
        build_model("inception_v3", 3, input_size=(512, 64))


def test_unknown_model_names_key():
    with pytest.raises(ConfigError, match="'model'"):
        build_model("resnet101", 2)


def test_dropout_sets_head_dropouts():
    model = build_model("vgg16", 2, dropout=0.2)
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    assert build_model("resnet50", 2, dropout=0.3).fc[0].p == 0.3
    assert build_model("resnet50", 2).fc[0].p == 0.0


def _stage_fake_weights(name, tmp_path, monkeypatch, old_densenet_keys=False):
    """A randomly initialised ImageNet-shaped state dict where the offline loader looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    state = getattr(torchvision.models, name)(weights=None, **kwargs).state_dict()
    if old_densenet_keys:  # the layout of torchvision's published file
        state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
                 for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = weights_file(name)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name,conv_key,other_key", [
    ("resnet50", "conv1.weight", "layer1.0.conv1.weight"),
    ("inception_v3", "Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch1x1.conv.weight"),
    ("densenet169", "features.conv0.weight", "features.denseblock1.denselayer1.conv2.weight"),
])
def test_imagenet_first_layer_adaptation(name, conv_key, other_key, tmp_path, monkeypatch):
    state = _stage_fake_weights(name, tmp_path, monkeypatch,
                                old_densenet_keys=name == "densenet169")
    assert weights_file(name).name == weights_url(name).rsplit("/", 1)[1]
    if name == "densenet169":
        other_saved = state[other_key.replace("conv2.", "conv.2.")]
    else:
        other_saved = state[other_key]
    rgb = state[conv_key]
    model = build_model(name, 3, weights="imagenet")
    w = first_conv(model, name).weight
    assert torch.allclose(w[:, 0], rgb.sum(1))                    # image channel: grey through RGB
    assert torch.allclose(w[:, 1], rgb.mean(1))                   # mask channels: RGB mean
    assert torch.allclose(w[:, 2], rgb.mean(1))
    assert torch.equal(model.state_dict()[other_key], other_saved)  # everything else as loaded


def test_adapted_conv_keeps_bias_and_two_channels():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    new = _adapted_conv(conv, 2, pretrained=True)
    assert new.weight.shape == (4, 2, 3, 3) and new.padding == (1, 1)
    assert torch.equal(new.bias, conv.bias)
    assert torch.allclose(new.weight[:, 0], conv.weight.sum(1))
    random_init = _adapted_conv(conv, 2, pretrained=False)
    assert torch.equal(random_init.weight, conv.weight[:, :2])


def test_missing_weights_tell_how_to_prestage(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UsageError) as err:
        build_model("resnet50", 2, weights="imagenet")
    message = str(err.value)
    assert "pre-stage" in message and "TORCH_HOME" in message
    assert weights_url("resnet50") in message and str(weights_file("resnet50")) in message


def test_corrupt_weights_file_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weights_file("densenet169")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a usable densenet169"):
        build_model("densenet169", 2, weights="imagenet")


def test_parameter_count_and_flops():
    model = build_model("resnet50", 3)
    assert count_parameters(model) == 23_510_081
    for p in model.parameters():
        p.requires_grad = False
    for p in model.fc.parameters():
        p.requires_grad = True
    assert count_parameters(model, trainable_only=True) == 2049
    small = flops_per_sample(model, 3, 64, 64)
    assert model.training  # mode restored
    assert 3.5 < flops_per_sample(model, 3, 128, 128) / small < 4.5
    # ResNet50 at 224 x 224 is about 4.1 GMAC = 8.2 GFLOP
    assert 7.5e9 < small * (224 * 224) / (64 * 64) < 9e9


# --- the head under bf16 autocast, and the state_dict layout ----------------------------------------

# sha256 (16 hex) of each model's state_dict (key, shape) list as written before the head became
# Fp32Linear: checkpoints saved by earlier versions must keep loading.
STATE_DICT_LAYOUT = {"resnet18": "8a0e2f9cfa7bd8a6", "resnet50": "c7c655eb48fcfff5", "vgg16": "c799a2f7387abb87",
                     "densenet169": "dcd15018a001b88e", "inception_v3": "ae3d38ad49977cd8"}


def _heads(model):
    """The one-logit linear layers: the head, and inception_v3's auxiliary head when it has one."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]


@pytest.mark.parametrize("name", MODELS)
def test_head_runs_in_fp32_under_bf16_autocast_and_checkpoint_keys_are_unchanged(name):
    # One test per model: building vgg16 and densenet169 costs seconds, so each is built once.
    size = (299, 299) if name == "inception_v3" else (64, 32)
    model = build_model(name, 3, input_size=size).eval()
    heads = _heads(model)
    assert len(heads) == (2 if name == "inception_v3" else 1)
    for head in heads:
        # Features as a backbone under autocast hands them over: bf16.
        feats = torch.randn(4, head.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = head(feats)
            fp32 = nn.functional.linear(feats.float(), head.weight, head.bias)   # outside autocast
        assert out.dtype == torch.float32
        assert torch.equal(out, fp32)
    if name == "resnet18":                     # the whole network too (the cheap one)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.randn(2, 3, *size)).dtype == torch.float32
    layout = repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    assert hashlib.sha256(layout.encode()).hexdigest()[:16] == STATE_DICT_LAYOUT[name]


def test_a_checkpoint_with_plain_linear_heads_loads_strictly():
    """What earlier versions saved (nn.Linear heads) loads into today's model and gives its outputs."""
    model = build_model("resnet18", 3).eval()
    old = build_model("resnet18", 3).eval()
    plain = nn.Linear(old.fc[1].in_features, 1)
    old.fc[1] = plain
    model.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(model(x), old(x))
