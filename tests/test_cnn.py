"""CNN adapters: BatchNorm folding, blocks, export, sources, and the ``fit`` CLI end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
import yaml
from torch import nn

from flexround_pl.cli import FlexRoundCLI, main
from flexround_pl.models.adapter import find_architecture
from flexround_pl.models.cnn import (
    MOBILENET_V2,
    RESNET,
    ResNetStem,
    count_quantizable,
    fold_batchnorm,
    torchvision_state_dict,
)
from flexround_pl.models.vision import FashionMNISTResNet18, TorchvisionModel
from flexround_pl.quant.config import GridConfig, QuantConfig
from flexround_pl.quant.surgery import harden_modules, quantize_modules, quantized_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.get_model(name, num_classes=5, **kw))


def _head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torchvision.models.ResNet):
        return model.fc(torch.flatten(model.avgpool(h), 1))
    return model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


# ----------------------------------------------------------------------------- folding and blocks


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_folding_preserves_outputs_and_blocks_chain(name):
    model = _model(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    arch = find_architecture(model)
    assert arch is (RESNET if name == "resnet18" else MOBILENET_V2)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = arch.prepare(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(getattr(model, "_flexround_folded_bn")) == n_bn
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert type(model).__name__ == ("ResNet" if name == "resnet18" else "MobileNetV2")
    with torch.no_grad():
        torch.testing.assert_close(arch.forward(model, {"pixel_values": x}), ref, rtol=1e-4, atol=1e-5)

        blocks = arch.blocks(model)
        if name == "resnet18":
            assert [n for n, _ in blocks] == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        else:
            assert [n for n, _ in blocks] == [f"features.{i}" for i in range(19)]
        # every conv belongs to exactly one block; only the classifier is outside
        in_blocks = sum(count_quantizable(b) for _, b in blocks)
        assert in_blocks == count_quantizable(model) - 1
        h = x
        for _, block in blocks:  # output of block i is the input of block i + 1
            h = block(h)
        torch.testing.assert_close(_head(model, h), ref, rtol=1e-4, atol=1e-5)
    assert arch.prepare(model) is model  # idempotent


def test_resnet50_folding():
    model = _model("resnet50")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        RESNET.prepare(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    assert len(RESNET.blocks(model)) == 1 + 16


def test_fold_formula_single_pair():
    conv, bn = nn.Conv2d(2, 3, 1, bias=True), nn.BatchNorm2d(3)
    _randomize_bn(bn)
    net = nn.Sequential(conv, bn).eval()
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        ref = net(x)
        w, b = conv.weight.clone(), conv.bias.clone()
        fold_batchnorm(net)
        sigma = torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(net[0].weight, w * (bn.weight / sigma).reshape(-1, 1, 1, 1))
        torch.testing.assert_close(net[0].bias, (b - bn.running_mean) * bn.weight / sigma + bn.bias)
        assert isinstance(net[1], nn.Identity)
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_after_prepare():
    model = torchvision.models.resnet18(num_classes=5).eval()
    before = set(model.state_dict())
    RESNET.prepare(model)
    after = set(model.state_dict())
    assert isinstance(model.conv1, ResNetStem)
    assert "conv1.conv.weight" in after and "conv1.conv.bias" in after and "conv1.weight" not in after
    assert after - before == {"conv1.conv.weight", "conv1.conv.bias"} | {
        k.replace("bn", "conv").replace("downsample.1", "downsample.0").rsplit(".", 1)[0] + ".bias"
        for k in before
        if k.startswith("layer") and k.endswith(".bias") and (".bn" in k or "downsample.1" in k)
    }
    assert not any(".bn" in k or "downsample.1" in k for k in after)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_export_to_plain_torchvision(name):
    model = _model(name, **({"width_mult": 0.25} if name == "mobilenet_v2" else {}))
    arch = find_architecture(model)
    arch.prepare(model)
    x = torch.randn(2, 3, 32, 32)
    # quantize a few layers (RTN, hardened): export carries the dequantized weights
    rtn = QuantConfig(method="rtn", weight=GridConfig(bits=4, init="minmax"))
    name0, block0 = arch.blocks(model)[0]
    assert quantize_modules(block0, rtn, eight_bit=arch.eight_bit, prefix=name0)
    harden_modules(block0)
    (layer,) = [m for _, m in quantized_layers(block0)]
    assert layer.grid_cfg.bits == 8  # first layer at 8 bits
    fresh = torchvision.models.get_model(name, num_classes=5, **({"width_mult": 0.25} if name == "mobilenet_v2" else {}))
    fresh.load_state_dict(torchvision_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def test_eight_bit_rules_match_first_and_last_layers():
    import re

    model = RESNET.prepare(torchvision.models.resnet18(num_classes=5).eval())
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    eight = [n for n in names if any(re.search(p, n) for p in RESNET.eight_bit)]
    assert eight == ["conv1.conv", "fc"]
    mb = MOBILENET_V2.prepare(torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25).eval())
    names = [n for n, m in mb.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [n for n in names if any(re.search(p, n) for p in MOBILENET_V2.eight_bit)] == ["features.0.0", "classifier.1"]


def test_blocks_need_prepare():
    with pytest.raises(ValueError, match="prepare"):
        RESNET.blocks(torchvision.models.resnet18(num_classes=5))


# ----------------------------------------------------------------------------- sources


def test_torchvision_source_local_state_dict(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=4, width_mult=0.25)
    path = tmp_path / "mb.pt"
    torch.save(net.state_dict(), path)
    src = TorchvisionModel(arch="mobilenet_v2", weights=str(path), model_kwargs={"width_mult": 0.25})
    src.check()
    loaded = src.load(num_labels=4)
    assert not loaded.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))
    with pytest.raises(ValueError, match="4 classes but 10"):
        src.load(num_labels=10)


def test_torchvision_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        TorchvisionModel(arch="vgg16")
    with pytest.raises(ValueError, match="unknown weights"):
        TorchvisionModel(arch="resnet18", weights="IMAGENET9K").check()
    with pytest.raises(ValueError, match="does not exist"):
        TorchvisionModel(arch="resnet18", weights=str(tmp_path / "none.pt")).check()
    with pytest.raises(ValueError, match="1000 classes"):
        TorchvisionModel(arch="resnet18", weights="IMAGENET1K_V1").load(num_labels=10)
    with pytest.raises(ValueError, match="num_classes=3"):
        TorchvisionModel(arch="resnet18", weights="random", num_classes=3).load(num_labels=10)
    bad = tmp_path / "bad.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), bad)
    with pytest.raises(ValueError, match="torchvision mobilenet_v2"):
        TorchvisionModel(arch="mobilenet_v2", weights=str(bad)).load()


def test_fashion_mnist_source_cache_and_errors(tmp_path):
    src = FashionMNISTResNet18(data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"))
    assert src.cache_path().startswith(str(tmp_path / "cache" / "fashion_mnist_resnet18"))
    assert src.fingerprint() != FashionMNISTResNet18(data_dir=str(tmp_path / "none"), seed=1).fingerprint()
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        src.check()
    with pytest.raises(ValueError, match="10 classes"):
        src.load(num_labels=3)
    # a cached checkpoint is loaded without the data
    os.makedirs(src.cache_path())
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), os.path.join(src.cache_path(), "model.pt"))
    src.check()
    loaded = src.load(num_labels=10)
    assert loaded.conv1.in_channels == 1 and not loaded.training


# ----------------------------------------------------------------------------- end to end


@pytest.fixture()
def write_cnn_config(write_run_config):
    """``write_cnn_config(tmp_path, source, max_steps=6, **data)``: FlexRound W3 min-max on DigitsData."""

    def write(tmp_path, source: dict, max_steps: int = 6, **data) -> str:
        return write_run_config(
            tmp_path, source=source,
            quant={"method": "flexround", "weight": {"bits": 3, "granularity": "tensor", "init": "minmax"}},
            reconstruction={"lr": 0.01, "batch_size": 8, "eval_batch_size": 32, "evaluations": 2},
            data={"class_path": "flexround_pl.data.images.DigitsData",
                  "init_args": {"num_calibration": 24, "num_eval": 48, "image_size": 32, "batch_size": 8, **data}},
            max_steps=max_steps, log_every_n_steps=4,
        )

    return write


E2E = {
    "resnet18": (
        {"arch": "resnet18", "weights": "random", "in_channels": 1},
        ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
        "fc",
    ),
    "mobilenet_v2": (
        {"arch": "mobilenet_v2", "weights": "random", "model_kwargs": {"width_mult": 0.25}},
        [f"features.{i}" for i in range(19)],
        "classifier.1",
    ),
}


def _data_bn_checkpoint(path, init_args: dict, channels: int) -> str:
    """Random-init weights with BatchNorm statistics measured on digits (well-scaled activations).

    With torchvision's default statistics (mean 0, var 1) a random MobileNetV2's
    activations shrink ~10x per block and the late blocks' losses underflow.
    """
    from flexround_pl.data.images import DigitsData

    net = TorchvisionModel(**{**init_args, "num_classes": 10}).load()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for batch in DigitsData(num_calibration=64, batch_size=32, channels=channels, seed=5).calibration_dataloader():
            net(batch["pixel_values"])
    torch.save(net.eval().state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", list(E2E))
def test_fit_end_to_end(tmp_path, name, write_cnn_config):
    init_args, block_names, head = E2E[name]
    channels = init_args.get("in_channels", 3)
    weights = _data_bn_checkpoint(tmp_path / "init.pt", init_args, channels)
    init_args = {**init_args, "weights": weights}
    source = {"class_path": "flexround_pl.models.vision.TorchvisionModel", "init_args": init_args}
    cfg = write_cnn_config(tmp_path, source, channels=channels)
    assert main(["fit", "--config", cfg]) == 0

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["architecture"] == ("resnet" if name == "resnet18" else "mobilenet_v2")
    assert set(results["fp"]) == {"top1", "top5"} and set(results["quantized"]) == {"top1", "top5", "fp_agreement", "fp_kl"}
    assert [b["name"] for b in results["blocks"]] == block_names
    assert results["outside_blocks_rtn"] == [head]

    # quantized layers per block = its conv / linear layers (nothing is FP by default)
    torch.manual_seed(0)
    ref = TorchvisionModel(**{**init_args, "num_classes": 10}).load()
    arch = find_architecture(ref)
    arch.prepare(ref)
    expected = {n: count_quantizable(b) for n, b in arch.blocks(ref)}
    for block in results["blocks"]:
        assert block["quantized_layers"] == expected[block["name"]], block
        if block["name"] == block_names[0]:
            # the stem conv is at 8 bits: a random-init stem barely moves in a few steps
            assert block["loss_end"] <= block["loss_start"], block
        else:
            assert block["loss_end"] < block["loss_start"], block
        assert block["steps"] == 6

    # the quantized checkpoint reloads into the prepared CNN (validate) and the
    # plain export loads into a fresh torchvision model: both give the fit's metrics
    val = FlexRoundCLI(args=["validate", "--config", str(tmp_path / "run" / "config.yaml")])
    assert val.results["quantized"] == results["quantized"]
    export = torch.load(tmp_path / "run" / "export" / "model_state_dict.pt")
    plain = TorchvisionModel(**{**init_args, "num_classes": 10}).load()
    plain.load_state_dict(export, strict=True)
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), val.model.net(x), rtol=1e-4, atol=1e-4)

    # top-1 / agreement against a plain loop over the run's eval images with the exported torchvision model
    from flexround_pl.data.images import DigitsData

    data = DigitsData(**yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["init_args"])
    data.setup("fit")
    fp_net = TorchvisionModel(**{**init_args, "num_classes": 10}).load()
    labels, q_pred, fp_pred = [], [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            labels.append(batch["labels"])
            q_pred.append(plain(batch["pixel_values"]).argmax(-1))
            fp_pred.append(fp_net(batch["pixel_values"]).argmax(-1))
    labels, q_pred, fp_pred = torch.cat(labels), torch.cat(q_pred), torch.cat(fp_pred)
    slack = 1.01 / len(labels)  # one image: float noise between the two batchings
    assert results["quantized"]["top1"] == pytest.approx((q_pred == labels).float().mean().item(), abs=slack)
    assert results["fp"]["top1"] == pytest.approx((fp_pred == labels).float().mean().item(), abs=slack)
    assert results["quantized"]["fp_agreement"] == pytest.approx((q_pred == fp_pred).float().mean().item(), abs=slack)


def test_fit_keep_fp_layers(tmp_path, write_cnn_config):
    init_args = {"arch": "resnet18", "weights": "random", "in_channels": 1}
    source = {"class_path": "flexround_pl.models.vision.TorchvisionModel", "init_args": init_args}
    cfg = write_cnn_config(tmp_path, source, max_steps=0, channels=1)
    args = ["fit", "--config", cfg, "--model.quant.method", "rtn", "--model.quant.keep_fp", '["downsample", "^fc$"]']
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    counts = {b["name"]: b["quantized_layers"] for b in results["blocks"]}
    assert counts["layer1.0"] == 2 and counts["layer2.0"] == 2 and counts["conv1"] == 1  # downsample kept FP
    assert results["outside_blocks_rtn"] == []


def test_fit_bad_data_dir_is_a_clear_error(tmp_path, capsys, write_cnn_config):
    source = {"class_path": "flexround_pl.models.vision.TorchvisionModel", "init_args": {"arch": "resnet18", "weights": "random"}}
    cfg = write_cnn_config(tmp_path, source)
    config = yaml.safe_load(open(cfg))
    config["data"] = {
        "class_path": "flexround_pl.data.images.ImageFolderData",
        "init_args": {"train_dir": str(tmp_path / "nope"), "val_dir": str(tmp_path / "nope")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", cfg]) == 2
    assert "train_dir" in capsys.readouterr().err


class _ParseOnlyCLI(FlexRoundCLI):
    def instantiate_classes(self) -> None:
        pass


def test_shipped_configs_parse():
    for name in ("resnet18_imagenet", "resnet50_imagenet", "mobilenetv2_imagenet", "resnet18_fashionmnist"):
        path = os.path.join(ROOT, "configs", f"{name}.yaml")
        cfg = yaml.safe_load(open(path))
        assert cfg["model"]["quant"]["weight"]["granularity"] == "tensor"
        assert cfg["model"]["quant"]["weight"]["bits"] == 4
        if "imagenet" in name:
            assert cfg["trainer"]["max_steps"] == 5000
            assert cfg["data"]["init_args"]["num_calibration"] == 1024
            assert cfg["model"]["reconstruction"]["batch_size"] == 32
            assert cfg["model"]["reconstruction"]["lr"] == (0.001 if "mobilenet" in name else 0.0004)
        # the whole file validates against the CLI's signatures (nothing is instantiated)
        cli = _ParseOnlyCLI(args=["--config", path], run=False)
        assert cli.config["model"]["source"]["class_path"].startswith("flexround_pl.models.vision.")


@pytest.mark.slow
def test_fashion_mnist_config_runs(tmp_path):
    """The offline CNN config end to end, with few iterations (trains the model once if not cached)."""
    path = os.path.join(ROOT, "configs", "resnet18_fashionmnist.yaml")
    args = ["fit", "--config", path, "--trainer.max_steps", "20", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.init_args.num_eval", "1000", "--data.init_args.num_calibration", "256"]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["fp"]["top1"] > 0.8
    assert results["quantized"]["top1"] > 0.7
    assert len(results["blocks"]) == 9
    assert all(b["loss_end"] <= b["loss_start"] for b in results["blocks"])


@pytest.mark.parametrize("eight_bit, fc_bits", [(None, 8), ([], 4)])
def test_eight_bit_rule_is_configurable(eight_bit, fc_bits):
    """The CNN last layer is 8-bit by default (paper convention); ``quant.eight_bit: []`` turns that off."""
    import torchvision

    from flexround_pl.models import find_architecture
    from flexround_pl.quant.config import GridConfig, QuantConfig
    from flexround_pl.reconstruct.driver import quantize_outside_blocks

    model = torchvision.models.resnet18(num_classes=3).eval()
    arch = find_architecture(model)
    model = arch.prepare(model)
    quant = QuantConfig(method="rtn", weight=GridConfig(bits=4, init="minmax"), eight_bit=eight_bit)
    swapped = quantize_outside_blocks(model, arch, quant)
    assert "fc" in swapped
    assert model.fc.grid_cfg.bits == fc_bits
