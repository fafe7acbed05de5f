"""TV-L1 flow: agreement with OpenCV-contrib's DualTVL1 (run in the same test), known motion, layout.

Full-size Middlebury pairs run once each, on the fast (compiled) path; the eager path is compared
with OpenCV on a Middlebury crop and with the fast path on small pairs, so every selectable path
is checked against the reference.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from quovadis.pipeline.conventions import rgb_to_gray
from quovadis.pipeline.errors import ConfigError, FlowError
from quovadis.pipeline.flow import (
    FlowConfig,
    FlowPredictor,
    _level_sizes,
    _EAGER,
    _compiled_kernels,
    _cubic_taps,
    _median_blur,
    _median_step_opencv,
    _remap_cubic,
    _resize_linear,
    _tvl1_step,
    compute_flow,
    tvl1,
    tvl1_opencv,
)
from quovadis.pipeline.flowviz import endpoint_error, read_flo
from tests.conftest import shared_path

EAGER = FlowConfig(fast=False, device="cpu")
FAST = FlowConfig(fast=True, device="cpu")
# Mean endpoint distance between our field and OpenCV's on the same input. Measured on the full
# Middlebury pairs (fast and eager paths): 0.0007-0.0068 px; the per-pixel differences are float
# rounding, amplified where TV-L1 is unstable (occlusions), never a systematic offset.
MAX_MEAN_DISTANCE_TO_OPENCV = 0.015

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine OpenMP threads mostly wait for each other
    (measured: 10x slower with 2 threads while other jobs run); results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on the CPU needs a C++ compiler (g++ or c++ on PATH)",
)


def cpu_kernels(name: str):
    """The eager or the compiled ("fast") kernels of the CPU path."""
    return _EAGER if name == "eager" else _compiled_kernels("cpu")


def hw2(flow_b2hw: np.ndarray | torch.Tensor) -> np.ndarray:
    """(2, H, W) -> (H, W, 2) numpy."""
    return np.asarray(flow_b2hw).transpose(1, 2, 0)


def textured(height: int, width: int, shift=(0.0, 0.0), rotation_deg: float = 0.0, seed: int = 0) -> np.ndarray:
    """A smooth texture (sum of sinusoids, periods 9-40 px) sampled at positions moved back by the
    motion, so that pixel p of the unmoved image is seen at p + motion: float32 (H, W) in 0..255."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    a = np.deg2rad(rotation_deg)
    # inverse motion: translation back, then rotation by -a about the centre
    xs, ys = x - shift[0] - cx, y - shift[1] - cy
    xs, ys = np.cos(a) * xs + np.sin(a) * ys + cx, -np.sin(a) * xs + np.cos(a) * ys + cy
    img = np.zeros_like(xs)
    for _ in range(12):
        period = rng.uniform(9, 40)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        img += np.sin(2 * np.pi * (np.cos(theta) * xs + np.sin(theta) * ys) / period + phase)
    img = (img - img.min()) / (img.max() - img.min())
    return (20 + 215 * img).astype(np.float32)


def middlebury(name: str):
    root = shared_path("flow", name)
    prev = cv2.imread(str(root / "frame10_gray.png"), cv2.IMREAD_GRAYSCALE)
    nxt = cv2.imread(str(root / "frame11_gray.png"), cv2.IMREAD_GRAYSCALE)
    return prev, nxt, read_flo(root / "flow10.flo")


def video_frames(path, count: int) -> np.ndarray:
    """The first `count` frames of a video as uint8 (T, H, W, 3) RGB, decoded by ffmpeg."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-frames:v", str(count),
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    cap = cv2.VideoCapture(str(path))  # only for the frame size
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    cap.release()
    return np.frombuffer(raw, np.uint8).reshape(count, h, w, 3)


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_are_opencv_defaults():
    algo = cv2.optflow.DualTVL1OpticalFlow_create()
    cfg = FlowConfig()
    assert (cfg.tau, cfg.lambda_, cfg.theta, cfg.gamma, cfg.epsilon, cfg.scale_step) == pytest.approx(
        (algo.getTau(), algo.getLambda(), algo.getTheta(), algo.getGamma(), algo.getEpsilon(), algo.getScaleStep())
    )
    assert (cfg.nscales, cfg.warps, cfg.inner_iterations, cfg.outer_iterations, cfg.median_filtering) == (
        algo.getScalesNumber(), algo.getWarpingsNumber(), algo.getInnerIterations(), algo.getOuterIterations(),
        algo.getMedianFiltering(),
    )


@pytest.mark.parametrize(
    "kwargs", [dict(backend="cuda"), dict(tau=0), dict(nscales=0), dict(scale_step=1.0), dict(median_filtering=7), dict(device="gpu0")]
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        FlowConfig(**kwargs)


def test_bad_frames_raise_flow_error():
    with pytest.raises(FlowError, match="equal shape"):
        tvl1(np.zeros((1, 32, 32), np.uint8), np.zeros((1, 32, 33), np.uint8), EAGER)
    with pytest.raises(FlowError, match="uint8"):
        FlowPredictor(EAGER)(np.zeros((3, 32, 32, 3), np.float32))


# ---------------------------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("k", [3, 5])
def test_median_is_cv_median_blur(k):
    rng = np.random.default_rng(k)
    u = rng.normal(size=(2, 2, 37, 53)).astype(np.float32)
    u[:, :, :10] = np.round(u[:, :, :10])  # ties
    ours = _median_blur(torch.from_numpy(u), k).numpy()
    for b in range(2):
        for c in range(2):
            np.testing.assert_array_equal(ours[b, c], cv2.medianBlur(u[b, c], k))


@pytest.mark.parametrize("kernels", ["eager", pytest.param("fast", marks=needs_compiler)])
def test_warp_is_cv_remap_cubic(kernels):
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (2, 3, 41, 57)).astype(np.float32)
    u = rng.uniform(-4, 4, (2, 2, 41, 57)).astype(np.float32)
    u[:, :, :8] = np.round(u[:, :, :8])  # integer positions must give the pixel exactly
    u[:, :, -4:] *= 5  # far outside the image: 0
    ours = _remap_cubic(_cubic_taps(torch.from_numpy(img)), img.shape, torch.from_numpy(u), cpu_kernels(kernels)).numpy()
    for b in range(2):
        xs = (np.arange(57)[None, :] + u[b, 0]).astype(np.float32)
        ys = (np.arange(41)[:, None] + u[b, 1]).astype(np.float32)
        for c in range(3):
            ref = cv2.remap(img[b, c], xs, ys, cv2.INTER_CUBIC)  # default border: constant 0
            np.testing.assert_allclose(ours[b, c], ref, atol=1e-3)
            np.testing.assert_array_equal(ours[b, c, :8], ref[:8])
    assert (ours[:, :, -4:] == 0).mean() > 0.5  # the far taps read the zero frame


@pytest.mark.parametrize("kernels", ["eager", pytest.param("fast", marks=needs_compiler)])
def test_steps_per_call_equal_single_steps_and_freeze_a_stopped_pair(kernels):
    rng = np.random.default_rng(3)
    b, h, w = 2, 23, 31
    u, direction = (torch.from_numpy(rng.normal(size=(b, 2, h, w)).astype(np.float32)) for _ in range(2))
    p = torch.from_numpy(rng.normal(size=(b, 2, 2, h, w)).astype(np.float32)) * 0.1
    inv_grad = 1 / (direction.square().sum(1, keepdim=True) + 0.1)
    rho_c = torch.from_numpy(rng.normal(size=(b, 1, h, w)).astype(np.float32))
    scalars = (0.045, 0.3, 0.8333333)
    everyone = torch.ones(b, dtype=torch.bool)
    one = _tvl1_step(u, p, everyone, direction, inv_grad, rho_c, torch.zeros(1), *scalars)
    err = (one[0] - u).square().sum(dim=(1, 2, 3))
    eps = err.mean().reshape(1)  # between the two pairs' first changes: one pair stops after one iteration
    assert (err > eps).tolist().count(True) == 1
    first = _tvl1_step(u, p, everyone, direction, inv_grad, rho_c, eps, *scalars)
    second = _tvl1_step(*first, direction, inv_grad, rho_c, eps, *scalars)
    got = cpu_kernels(kernels).step(2, u, p, everyone, direction, inv_grad, rho_c, eps, *scalars)
    for ours, ref in zip(got, second):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    stopped = int(torch.argmin(err))
    torch.testing.assert_close(got[0][stopped], first[0][stopped], rtol=0, atol=0)  # frozen after its first
    assert not got[2][stopped] and bool(got[2][1 - stopped]) == bool(second[2][1 - stopped])


@pytest.mark.parametrize("k", [3, 5])
def test_cpu_median_step_is_our_network(k):
    # on the CPU the median is cv::medianBlur; elsewhere our network: the two must agree exactly,
    # and a pair that has stopped keeps its field
    rng = np.random.default_rng(k)
    u = torch.from_numpy(rng.normal(size=(3, 3, 29, 41)).astype(np.float32))
    active = torch.tensor([True, False, True])
    got = _median_step_opencv(u, active, k)
    for b in (0, 2):
        torch.testing.assert_close(got[b, :2], _median_blur(u[b : b + 1, :2], k)[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], u[1], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 2], u[:, 2], rtol=0, atol=0)  # the illumination channel is not filtered


def test_pyramid_is_cv_resize():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 255, (45, 61)).astype(np.float32)
    ref = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    assert _level_sizes(45, 61, FlowConfig())[1] == ref.shape
    ours = _resize_linear(torch.from_numpy(img)[None, None], ref.shape, (1 / 0.8, 1 / 0.8))[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    up = cv2.resize(ref, (61, 45), interpolation=cv2.INTER_LINEAR)
    ours_up = _resize_linear(torch.from_numpy(ref)[None, None], (45, 61), (ref.shape[0] / 45, ref.shape[1] / 61))
    np.testing.assert_allclose(ours_up[0, 0].numpy(), up, atol=1e-2)
    assert _level_sizes(256, 340, FlowConfig()) == [(256, 340), (205, 272), (164, 218), (131, 174), (105, 139)]
    assert _level_sizes(24, 30, FlowConfig()) == [(24, 30), (19, 24)]  # 15 x 19 is below 16: OpenCV stops


def test_tiny_frames_match_opencv():
    # 22 x 30: the pyramid stops after two levels, the border rules act on most pixels
    prev, nxt = textured(22, 30), textured(22, 30, shift=(0.6, 0.3))
    ours = hw2(tvl1(prev, nxt, EAGER)[0].numpy())
    assert endpoint_error(ours, hw2(tvl1_opencv(prev, nxt, EAGER)[0])) < MAX_MEAN_DISTANCE_TO_OPENCV


# ---------------------------------------------------------------------------------------------- Middlebury


@pytest.fixture(scope="module")
def opencv_middlebury():
    """OpenCV's flow on each Middlebury pair, computed once for the tests of both paths."""
    cache = {}

    def get(name):
        if name not in cache:
            prev, nxt, _ = middlebury(name)
            cache[name] = hw2(tvl1_opencv(prev, nxt, EAGER)[0])
        return cache[name]

    return get


@pytest.mark.parametrize("cfg", [EAGER, pytest.param(FAST, marks=needs_compiler)], ids=["eager", "fast"])
@pytest.mark.parametrize("name", ["RubberWhale", "Venus"])
def test_middlebury_matches_opencv(name, cfg, opencv_middlebury):
    prev, nxt, truth = middlebury(name)
    ref = opencv_middlebury(name)
    ours = hw2(tvl1(prev, nxt, cfg)[0].numpy())
    epe_ref, epe_ours = endpoint_error(ref, truth), endpoint_error(ours, truth)
    assert abs(epe_ours - epe_ref) <= 0.05 * epe_ref, (epe_ours, epe_ref)
    assert endpoint_error(ours, ref) < MAX_MEAN_DISTANCE_TO_OPENCV


# ---------------------------------------------------------------------------------------------- known motion


@pytest.mark.parametrize("shift", [(1.3, -0.7), (-2.6, 0.4)])
def test_subpixel_translation(shift):
    prev, nxt = textured(96, 112), textured(96, 112, shift=shift)
    flow = hw2(tvl1(prev, nxt, EAGER)[0].numpy())
    interior = np.s_[8:-8, 8:-8]
    truth = np.broadcast_to(np.asarray(shift, np.float32), flow.shape)
    # TV-L1 stops short of the exact shift (epsilon): OpenCV's EPE here is 0.044-0.065 px
    assert endpoint_error(flow[interior], truth[interior]) < 0.1
    ref = hw2(tvl1_opencv(prev, nxt, EAGER)[0])
    assert endpoint_error(flow, ref) < MAX_MEAN_DISTANCE_TO_OPENCV


def test_small_rotation():
    h, w, deg = 112, 112, 2.0
    prev, nxt = textured(h, w), textured(h, w, rotation_deg=deg)
    flow = hw2(tvl1(prev, nxt, EAGER)[0].numpy())
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = np.deg2rad(deg)
    truth = np.stack(
        [np.cos(a) * (x - cx) - np.sin(a) * (y - cy) + cx - x, np.sin(a) * (x - cx) + np.cos(a) * (y - cy) + cy - y], -1
    )
    interior = np.s_[10:-10, 10:-10]
    assert np.abs(truth[interior]).max() > 1.5  # the motion is not trivial
    assert endpoint_error(flow[interior], truth[interior]) < 0.1


def test_x_is_channel_zero_and_output_layout():
    prev, nxt = textured(64, 80), textured(64, 80, shift=(2.0, 0.0))
    flow = tvl1(torch.from_numpy(prev)[None], torch.from_numpy(nxt)[None], EAGER)
    assert flow.dtype == torch.float32 and flow.shape == (1, 2, 64, 80) and flow.device.type == "cpu"
    interior = flow[0, :, 8:-8, 8:-8]
    assert interior[0].mean() == pytest.approx(2.0, abs=0.05)
    assert interior[1].abs().mean() < 0.05


# ---------------------------------------------------------------------------------------------- batching, dtypes


def test_uint8_and_float_input_give_the_same_flow():
    prev, nxt = (np.round(textured(64, 64, shift=s)).astype(np.uint8) for s in ((0, 0), (1.5, 0.5)))
    as_uint8 = tvl1(prev[None], nxt[None], EAGER)
    as_float = tvl1(prev[None].astype(np.float32), torch.from_numpy(nxt[None]).double(), EAGER)
    torch.testing.assert_close(as_uint8, as_float, rtol=0, atol=0)
    # and the OpenCV backend reads float input on the same 0..255 scale
    np.testing.assert_allclose(tvl1_opencv(prev, nxt, EAGER), tvl1_opencv(prev.astype(np.float32), nxt.astype(np.float32), EAGER), atol=1e-3)


@pytest.mark.parametrize("cfg", [EAGER, pytest.param(FAST, marks=needs_compiler)], ids=["eager", "fast"])
def test_batch_equals_one_by_one(cfg):
    # pairs that converge after different numbers of iterations: each must stop on its own
    shifts = [(0.0, 0.0), (1.3, -0.7), (3.0, 2.0)]
    prev = np.stack([textured(64, 72, seed=i) for i in range(3)])
    nxt = np.stack([textured(64, 72, shift=s, seed=i) for i, s in enumerate(shifts)])
    batch = tvl1(prev, nxt, cfg)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], tvl1(prev[i : i + 1], nxt[i : i + 1], cfg), rtol=0, atol=1e-4)


def test_gamma_and_parameters_reach_both_backends():
    prev, nxt = textured(64, 64), textured(64, 64, shift=(1.0, 1.0)) * 0.9 + 10  # brightness change
    cfg = dataclasses.replace(EAGER, gamma=0.1, nscales=3, warps=3, median_filtering=3)
    ours = hw2(tvl1(prev, nxt, cfg)[0].numpy())
    ref = hw2(tvl1_opencv(prev, nxt, cfg)[0])
    assert endpoint_error(ours, ref) < MAX_MEAN_DISTANCE_TO_OPENCV
    assert endpoint_error(ours, hw2(tvl1_opencv(prev, nxt, EAGER)[0])) > 0.01  # the parameters changed the result


# ---------------------------------------------------------------------------------------------- videos


def test_real_video_frames_match_opencv():
    # frames 0-3 of a 25 fps file whose content changes every other frame: pairs still, moving, still
    rgb = video_frames(shared_path("videos", "mmaction2_test_mpeg4.avi"), 4)  # 240 x 320
    gray = rgb_to_gray(rgb)
    ours = compute_flow(gray, dataclasses.replace(EAGER, batch_pairs=2))
    ref = compute_flow(gray, dataclasses.replace(EAGER, backend="opencv"))
    assert ours.shape == ref.shape == (3, 240, 320, 2) and ours.dtype == np.float32
    assert np.hypot(*ref[2].transpose(2, 0, 1)).mean() > 0.2  # there is motion to find
    for t in range(3):
        assert endpoint_error(ours[t], ref[t]) < MAX_MEAN_DISTANCE_TO_OPENCV


def test_flow_predictor_sets_torch_and_opencv_threads():
    # a CPU flow actor holds one core: OpenCV (the median, the opencv backend) must not use the others
    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        FlowPredictor(dataclasses.replace(EAGER, cpu_threads=2))
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (2, 2)
        FlowPredictor(dataclasses.replace(EAGER, backend="opencv", cpu_threads=1))
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_flow_predictor_on_rgb_frames():
    rgb = np.stack([np.repeat(np.round(textured(48, 64, shift=(t * 0.8, 0))).astype(np.uint8)[..., None], 3, -1) for t in range(4)])
    predictor = FlowPredictor(dataclasses.replace(EAGER, batch_pairs=2))
    flow = predictor(rgb)
    assert flow.shape == (3, 48, 64, 2) and flow.dtype == np.float32
    np.testing.assert_array_equal(flow, compute_flow(rgb_to_gray(rgb), EAGER))
    assert np.abs(flow[:, 8:-8, 8:-8, 0].mean() - 0.8) < 0.05
    assert predictor(rgb[:1]).shape == (0, 48, 64, 2)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast-cuda-graphs"])
@pytest.mark.parametrize("name", ["RubberWhale", "Venus"])
def test_cuda_middlebury_matches_opencv(name, fast, opencv_middlebury):
    prev, nxt, truth = middlebury(name)
    ref = opencv_middlebury(name)
    flow = tvl1(prev, nxt, FlowConfig(device="cuda", fast=fast))
    assert flow.device.type == "cuda" and flow.dtype == torch.float32
    ours = hw2(flow[0].cpu().numpy())
    assert abs(endpoint_error(ours, truth) - endpoint_error(ref, truth)) <= 0.05 * endpoint_error(ref, truth)
    assert endpoint_error(ours, ref) < MAX_MEAN_DISTANCE_TO_OPENCV


@pytest.mark.gpu
def test_cuda_graph_batch_equals_one_by_one_and_is_reusable():
    cfg = FlowConfig(device="cuda", fast=True)
    shifts = [(0.0, 0.0), (1.3, -0.7), (3.0, 2.0), (-0.5, 0.25)]
    prev = np.stack([textured(96, 128, seed=i) for i in range(4)])
    nxt = np.stack([textured(96, 128, shift=s, seed=i) for i, s in enumerate(shifts)])
    batch = tvl1(prev, nxt, cfg)
    again = tvl1(prev, nxt, cfg)  # replays the cached graphs with new state
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    for i in range(4):
        one = tvl1(prev[i : i + 1], nxt[i : i + 1], cfg)
        assert endpoint_error(hw2(batch[i].cpu().numpy()), hw2(one[0].cpu().numpy())) < 1e-3
    cpu = tvl1(prev, nxt, EAGER)
    for i in range(4):
        assert endpoint_error(hw2(batch[i].cpu().numpy()), hw2(cpu[i].numpy())) < MAX_MEAN_DISTANCE_TO_OPENCV


@pytest.mark.gpu
def test_cuda_flow_predictor():
    rgb = video_frames(shared_path("videos", "mmaction2_test_mpeg4.avi"), 6)
    flow = FlowPredictor(FlowConfig(device="cuda", batch_pairs=4))(rgb)
    ref = compute_flow(rgb_to_gray(rgb), dataclasses.replace(EAGER, backend="opencv"))
    assert flow.shape == ref.shape == (5, 240, 320, 2)
    for t in range(5):
        assert endpoint_error(flow[t], ref[t]) < MAX_MEAN_DISTANCE_TO_OPENCV


def test_automatic_fast_path_falls_back_to_eager_without_a_compiler(tmp_path):
    """fast=None on a machine where torch.compile cannot build (no C++ compiler): a warning, then
    the eager result."""
    import os
    import sys

    code = (
        "import logging, numpy as np, torch; torch.set_num_threads(1); logging.basicConfig(level=logging.WARNING)\n"
        "from quovadis.pipeline.flow import FlowConfig, tvl1\n"
        "from tests.pipeline.test_flow import textured\n"
        "prev, nxt = textured(40, 48), textured(40, 48, shift=(1.0, 0.5))\n"
        "auto = tvl1(prev, nxt, FlowConfig(device='cpu'))\n"
        "eager = tvl1(prev, nxt, FlowConfig(device='cpu', fast=False))\n"
        "assert torch.equal(auto, eager)\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=str(Path(__file__).resolve().parents[2]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout
    assert "compiled path failed" in result.stderr
