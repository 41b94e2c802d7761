"""Torchvision backbones adapted to the loader's channels, with a one-logit head.

`build_model(name, in_channels, weights, dropout, input_size)` returns a binary classifier whose
output is the malignancy logit, shape (N, 1): resnet50 (the study's network), inception_v3, vgg16,
densenet169.

Input channels. The loader stacks the whole grey image (channel 0), this lesion's mask (channel 1)
and optionally the study's other lesions (channel 2). None of them is a colour, so the ImageNet RGB
filters of the first convolution are not kept as they are:

- image channel:  W_img  = W_R + W_G + W_B   (a grey image seen through the RGB filters is exactly
                                                the grey value on all three inputs, so the pretrained
                                                response to the image is preserved unchanged)
- mask channels:  W_mask = (W_R + W_G + W_B) / 3   (the RGB mean: a mask starts out as a dim grey
                                                overlay that the pretrained edge and blob detectors
                                                already respond to; zero-initialising them would
                                                hide the lesion from the network at step 0)
- bias, when the layer has one (vgg16), is kept.

With `weights="none"` the first convolution keeps torchvision's own random initialisation, taking
channel c from RGB filter c mod 3 (that initialisation depends on the output channels and kernel,
so the distribution is the one torchvision would draw).

ImageNet weights (`weights="imagenet"`, IMAGENET1K_V1 for all four, the study's era) are read only
from the torch hub cache, `$TORCH_HOME/hub/checkpoints/` (see `weights_file`), and loaded with
`torch.load(weights_only=True)`; compute nodes are often offline, so nothing is downloaded: a missing
file raises UsageError that says how to pre-stage it.

Outputs and inception_v3's auxiliary classifier. Every model returns a tensor (N, 1), except
inception_v3 built with its auxiliary classifier, which in train mode returns torchvision's
`InceptionOutputs(logits, aux_logits)` (both (N, 1)); in eval mode it returns the tensor like the
others. The training loop uses one rule for every model:

    main, aux = split_logits(model(x))
    loss = bce(main, y) + (AUX_LOSS_WEIGHT * bce(aux, y) if aux is not None else 0)

The auxiliary classifier needs an input of at least 299 x 299 (INCEPTION_AUX_MIN_SIZE): it is turned
on only when `input_size=(H, W)` is given and both sides reach that size, so at the study's
512 x 256 it is off. inception_v3 without it needs at least 75 x 75 (INCEPTION_MIN_SIZE); a smaller
`input_size` is a ConfigError naming train_size.

The final linear layer of every head (and of inception_v3's auxiliary head) is an `Fp32Linear`: under
bf16 autocast it leaves autocast and computes in float32 from a float32 copy of its input, so the logit
(and the loss and the AUC ranking that come from it) carries fp32 precision; bf16's 8-bit mantissa
would round logits to ~0.4 % and tie close scores. It is an nn.Linear subclass with the same
parameters, so state_dict keys (and old checkpoints) are unchanged.

`dropout`: None keeps each architecture's own head (vgg16: two dropouts of 0.5; inception_v3: one of
0.5; resnet50 and densenet169: none); a number sets those dropouts to it and, for resnet50 and
densenet169, is the dropout in front of the final linear layer. The head's layer names do not depend
on the value, so checkpoints load across settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.inception import InceptionOutputs

from wbs_dist.config import MODELS
from wbs_dist.errors import ConfigError, UsageError

AUX_LOSS_WEIGHT = 0.4
INCEPTION_MIN_SIZE = 75
INCEPTION_AUX_MIN_SIZE = 299
# Mixed_6e's feature map must be >= 17 px for the auxiliary head's 5x5 pool and 5x5 convolution.
_AUX_MIN_FEATURE = 17

_WEIGHTS = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "inception_v3": torchvision.models.Inception_V3_Weights.IMAGENET1K_V1,
    "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "densenet169": torchvision.models.DenseNet169_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}

# Old densenet checkpoints (the ones torchvision still ships) name layers 'norm.1' etc.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def weights_url(name: str) -> str:
    """The download address of `name`'s ImageNet weights (what a login node fetches)."""
    return _WEIGHTS[_check_name(name)].url


def weights_file(name: str) -> Path:
    """Where the offline loader expects `name`'s ImageNet weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url(name)).name


def prestage_instructions(name: str) -> str:
    url = weights_url(name)
    return (
        f"ImageNet weights for {name} are not in the torch hub cache: expected {weights_file(name)}. "
        "Compute nodes are often offline, so pre-stage them once on a login node with internet, "
        "with TORCH_HOME on storage the compute nodes share:\n"
        "    export TORCH_HOME=/shared/path/torch\n"
        f"    python -c \"import torch; torch.hub.load_state_dict_from_url('{url}')\"\n"
        "then export the same TORCH_HOME in the job environment (or copy the file to the path above); "
        "use weights=none to train from random initialisation"
    )


def build_model(
    name: str,
    in_channels: int,
    weights: str = "none",
    dropout: float | None = None,
    input_size: tuple[int, int] | None = None,
) -> nn.Module:
    """A one-logit classifier over `in_channels` input channels (see the module docstring)."""
    _check_name(name)
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1 (got {in_channels})")
    if weights not in ("imagenet", "none"):
        raise ConfigError(f"config key 'weights': must be imagenet or none (got {weights!r})")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"build_model: dropout must be in [0, 1) (got {dropout!r})")
    aux = name == "inception_v3" and _inception_aux_fits(input_size)
    pretrained = weights == "imagenet"
    model = _backbone(name, aux, pretrained)
    if pretrained:
        _load_imagenet(model, name)
    if name == "inception_v3" and not aux:
        model.aux_logits = False
        model.AuxLogits = None
    _ADAPT[name](model, in_channels, pretrained, dropout)
    return model


def split_logits(output: torch.Tensor | InceptionOutputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, auxiliary logits or None) of any model built here, in any mode."""
    if isinstance(output, InceptionOutputs):
        return output.logits, output.aux_logits
    return output, None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_sample(model: nn.Module, in_channels: int, h: int, w: int) -> int:
    """Forward FLOPs (multiply and add counted apart) for one (in_channels, h, w) input, eval mode.

    A training step costs about three times this (forward, and backward for inputs and weights).
    """
    param = next(model.parameters())
    x = torch.zeros(1, in_channels, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def _check_name(name: str) -> str:
    if name not in MODELS:
        raise ConfigError(f"config key 'model': must be one of {', '.join(MODELS)} (got {name!r})")
    return name


def _inception_aux_fits(input_size: tuple[int, int] | None) -> bool:
    if input_size is None:
        return False
    h, w = input_size
    if h < INCEPTION_MIN_SIZE or w < INCEPTION_MIN_SIZE:
        raise ConfigError(
            f"config key 'train_size': inception_v3 needs inputs of at least "
            f"{INCEPTION_MIN_SIZE} x {INCEPTION_MIN_SIZE} px (got {h}x{w})"
        )
    return h >= INCEPTION_AUX_MIN_SIZE and w >= INCEPTION_AUX_MIN_SIZE


def _backbone(name: str, aux: bool, pretrained: bool) -> nn.Module:
    tv = torchvision.models
    if name == "inception_v3":
        # Pretrained files carry the auxiliary head, so it must exist to load them; build_model drops
        # it afterwards when unused. transform_input re-normalises 3 RGB inputs and would break ours.
        return tv.inception_v3(weights=None, aux_logits=aux or pretrained, transform_input=False,
                               init_weights=not pretrained)
    return {"resnet50": tv.resnet50, "resnet18": tv.resnet18, "vgg16": tv.vgg16, "densenet169": tv.densenet169}[name](weights=None)


def _load_imagenet(model: nn.Module, name: str) -> None:
    path = weights_file(name)
    if not path.is_file():
        raise UsageError(prestage_instructions(name))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if name == "densenet169":
            state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
        model.load_state_dict(state)
    except Exception as exc:  # any unreadable or mismatched file gets the same remedy
        # load_state_dict lists every mismatched key; the start says enough.
        reason = " ".join(str(exc).split())[:300]
        raise UsageError(
            f"{path} is not a usable {name} ImageNet checkpoint ({type(exc).__name__}: {reason}); "
            f"delete it and pre-stage it again.\n{prestage_instructions(name)}"
        ) from exc


def _adapted_conv(conv: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    with torch.no_grad():
        if pretrained:
            rgb_sum = conv.weight.sum(dim=1)
            new.weight[:, 0] = rgb_sum
            new.weight[:, 1:] = (rgb_sum / conv.in_channels).unsqueeze(1)
        else:
            new.weight.copy_(conv.weight[:, [c % conv.in_channels for c in range(in_channels)]])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class Fp32Linear(nn.Linear):
    """nn.Linear computed in float32 outside autocast (the module note says why); the same
    parameters and state_dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), bias)


def _head(in_features: int, dropout: float | None) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout or 0.0), Fp32Linear(in_features, 1))


def _adapt_resnet(model, in_channels, pretrained, dropout):
    model.conv1 = _adapted_conv(model.conv1, in_channels, pretrained)
    model.fc = _head(model.fc.in_features, dropout)


def _adapt_densenet169(model, in_channels, pretrained, dropout):
    model.features.conv0 = _adapted_conv(model.features.conv0, in_channels, pretrained)
    model.classifier = _head(model.classifier.in_features, dropout)


def _adapt_vgg16(model, in_channels, pretrained, dropout):
    model.features[0] = _adapted_conv(model.features[0], in_channels, pretrained)
    model.classifier[-1] = Fp32Linear(model.classifier[-1].in_features, 1)
    if dropout is not None:
        for layer in model.classifier:
            if isinstance(layer, nn.Dropout):
                layer.p = dropout


def _adapt_inception_v3(model, in_channels, pretrained, dropout):
    stem = model.Conv2d_1a_3x3
    stem.conv = _adapted_conv(stem.conv, in_channels, pretrained)
    model.fc = Fp32Linear(model.fc.in_features, 1)
    if dropout is not None:
        model.dropout.p = dropout
    if model.aux_logits:
        model.AuxLogits.fc = Fp32Linear(model.AuxLogits.fc.in_features, 1)
        model.AuxLogits.register_forward_pre_hook(_check_aux_input)


def _check_aux_input(module: nn.Module, args: tuple[torch.Tensor]) -> None:
    # Turns torch's "kernel size can't be greater than actual input size" deep inside the auxiliary
    # head into a message about the input size that caused it.
    h, w = args[0].shape[-2:]
    if h < _AUX_MIN_FEATURE or w < _AUX_MIN_FEATURE:
        raise UsageError(
            f"inception_v3 with its auxiliary classifier needs training inputs of at least "
            f"{INCEPTION_AUX_MIN_SIZE} x {INCEPTION_AUX_MIN_SIZE} px; this batch is smaller. "
            "Build the model with input_size=(H, W) of the real inputs"
        )


_ADAPT: dict[str, Callable[[nn.Module, int, bool, float | None], None]] = {
    "resnet50": _adapt_resnet,
    "inception_v3": _adapt_inception_v3,
    "vgg16": _adapt_vgg16,
    "densenet169": _adapt_densenet169,
    "resnet18": _adapt_resnet,
}
