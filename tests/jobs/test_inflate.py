"""`quovadis inflate`: a torchvision-layout GoogLeNet file in, an I3D file out that load_i3d reads."""

from __future__ import annotations

import pytest
import torch

from quovadis.jobs.cli import EXIT_CANNOT_RUN, EXIT_OK, main
from quovadis.models.googlenet import GoogLeNetBN
from quovadis.models.inflate import i3d_from_googlenet, i3d_resnet50
from quovadis.models.resnet import ResNet50
from quovadis.models.weights import load_i3d, load_weights, read_state_dict


def test_inflate_command_writes_loadable_i3d_weights(tmp_path):
    torch.manual_seed(0)
    googlenet = GoogLeNetBN(num_classes=1000)
    source = tmp_path / "googlenet.pth"
    # half precision and aux classifier keys, as downloaded checkpoints may have them
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in googlenet.state_dict().items()}
    torch.save({**state_dict, "aux2.fc2.bias": torch.zeros(1000)}, source)
    out = tmp_path / "i3d_rgb.pt"

    assert main(["inflate", str(source), "--out", str(out), "--mode", "center"]) == EXIT_OK
    model = load_i3d("rgb", out)
    assert model.num_classes == 1000
    expected = i3d_from_googlenet({k: v.float() for k, v in state_dict.items()}, mode="center")
    written = read_state_dict(out)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    w = model.Mixed_3b.b1b.conv3d.weight
    assert w.shape == (128, 96, 3, 3, 3) and not w[:, :, [0, 2]].any()  # center mode

    # refuses to overwrite, and a bad source is an error naming it, exit 3
    with pytest.raises(SystemExit) as usage:
        main(["inflate", str(source), "--out", str(out)])
    assert usage.value.code == 2
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(10, 1024)}, bad)
    assert main(["inflate", str(bad), "--out", str(tmp_path / "x.pt")]) == EXIT_CANNOT_RUN
    assert not (tmp_path / "x.pt").exists()
    flow_out = tmp_path / "i3d_flow.pt"
    assert main(["inflate", str(source), "--out", str(flow_out), "--in-channels", "2"]) == EXIT_OK
    assert load_i3d("flow", flow_out).in_channels == 2


def test_inflate_command_resnet50_with_inflate_init(tmp_path):
    torch.manual_seed(0)
    resnet = ResNet50(num_classes=10)
    source = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), source)
    out = tmp_path / "i3d_r50.pt"
    assert main(["inflate", str(source), "--net", "resnet50", "--inflate-init", "center", "--out", str(out)]) == EXIT_OK
    written = read_state_dict(out)
    model = i3d_resnet50(num_classes=10)
    load_weights(model, written)  # strict: the I3D-ResNet-50 keys and shapes
    w = written["conv1.weight"]
    assert w.shape == (64, 3, 5, 7, 7) and torch.equal(w[:, :, 2], resnet.conv1.weight) and not w[:, :, [0, 1, 3, 4]].any()
    with pytest.raises(SystemExit) as usage:  # only GoogLeNet inflation adapts the input channels
        main(["inflate", str(source), "--net", "resnet50", "--in-channels", "2", "--out", str(tmp_path / "f.pt")])
    assert usage.value.code == 2
