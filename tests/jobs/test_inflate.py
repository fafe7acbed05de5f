"""`quovadis inflate`: a torchvision-layout GoogLeNet file in, an I3D file out that load_i3d reads."""

from __future__ import annotations

import pytest
import torch

from quovadis.jobs.cli import EXIT_CANNOT_RUN, EXIT_OK, main
from quovadis.models.googlenet import GoogLeNetBN
from quovadis.models.inflate import i3d_from_googlenet
from quovadis.models.weights import load_i3d, read_state_dict


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
