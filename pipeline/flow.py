"""TV-L1 optical flow in PyTorch, batched over frame pairs, matching OpenCV-contrib's DualTVL1.

The algorithm is the Zach-Pock-Bischof duality TV-L1 with the improvements of Sanchez Perez,
Meinhardt-Llopis and Facciolo, "TV-L1 Optical Flow Estimation", IPOL 2013, in the form OpenCV
implements it (opencv_contrib modules/optflow/src/tvl1flow.cpp, `cv2.optflow.DualTVL1OpticalFlow`).
We follow OpenCV's numerics so that the two give the same field:

- intensities 0..255 as float32 (OpenCV takes uint8 as is; its float input is read as 0..1);
- pyramid: each level is the previous one resized by `scale_step` (bilinear, half-pixel centres,
  size rounded), no blur; it stops before a side would drop below 16 px;
- per level: centred gradient of I1 (one-sided, halved, at the borders); per warp, I1 and its
  gradient sampled at x + u by bicubic interpolation (A = -0.75, taps outside the image read 0);
- per outer iteration a 5x5 median of (u1, u2) (replicated border; on the CPU cv::medianBlur
  itself), then inner iterations of the thresholding step, u = v + theta div p, and the dual step
  p = (p + tau/theta grad u) / (1 + tau/theta |grad u|); the dual variables restart at 0 on each
  level;
- a pair stops iterating within a warp once sum |u_new - u|^2 <= epsilon^2 * area; pairs of a batch
  stop independently (their values freeze), so a batch gives the field each pair gets alone;
- the flow is upsampled bilinearly to the next level and multiplied by 1 / scale_step.

Contract: `tvl1(prev, next)` takes grayscale (B, H, W) frames, intensities 0..255 as uint8 or float,
and returns float32 (B, 2, H, W) flow in pixels, channel 0 = x (to the right), channel 1 = y (down):
the pixel (x, y) of `prev` is seen at (x + f0, y + f1) in `next`. `compute_flow` wraps it for a
video: uint8 (T, H, W) -> float32 (T-1, H, W, 2), field t is frame t -> t+1 (pipeline layout).

The fast path (`FlowConfig.fast`) runs the same iteration through torch.compile; on CUDA each outer
iteration (median + 30 inner iterations) is one CUDA graph replay and the host checks convergence
once per outer iteration: the per-pair masks keep the stopping exact whenever it is checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from quovadis.pipeline import conventions
from quovadis.pipeline.errors import ConfigError, FlowError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "opencv")
_MIN_LEVEL_SIDE = 16  # OpenCV stops the pyramid before a side gets smaller than this
_FLT_EPSILON = float(np.finfo(np.float32).eps)  # OpenCV's "gradient is zero" test in the threshold step
_CUBIC_A = -0.75  # cv::remap INTER_CUBIC kernel parameter
_CUDA_BATCH_PAIRS = 32  # default pairs per batch on CUDA (FlowConfig.batch_pairs None)
_STEPS_PER_CALL = 2  # inner iterations per step call outside CUDA graphs (_tvl1_steps)
_HUGE = 1e30  # 1 / |grad|^2 where |grad|^2 <= _FLT_EPSILON: the threshold step then saturates at +-l_t


@dataclass(frozen=True)
class FlowConfig:
    """TV-L1 parameters (OpenCV DualTVL1 defaults) and how to run them.

    backend: "torch" (ours) or "opencv" (cv2.optflow DualTVL1 on the CPU, pair by pair: the reference).
    device: torch device for the torch backend; None picks cuda when available, else cpu.
    fast: the fused path: torch.compile of the iteration, the median and the warp, and on CUDA one
        CUDA graph per outer iteration (median + inner iterations); the same numbers as eager up to
        float rounding. None: fast where it compiles (falling back to eager with a warning), False:
        eager, True: fast or an error.
    batch_pairs: frame pairs solved at once by `compute_flow` / `FlowPredictor`; None: 32 on CUDA,
        1 on the CPU (a batch iterates until its slowest pair stops, so on the CPU batching costs
        time: measured 0.23 CPU s per 256x340 pair one at a time, 0.50 in batches of 16).
    cpu_threads: torch and OpenCV threads `FlowPredictor` sets for its process (a Ray actor owns
        its process); None leaves their defaults. On a shared machine 1 is often fastest: OpenMP
        threads wait on each other when the cores are busy.
    """

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    gamma: float = 0.0
    median_filtering: int = 5
    backend: str = "torch"
    device: str | None = None
    fast: bool | None = None
    batch_pairs: int | None = None
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"flow backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("tau", "lambda_", "theta", "epsilon"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"flow {name} must be > 0, got {getattr(self, name)}")
        for name in ("nscales", "warps", "inner_iterations", "outer_iterations", "batch_pairs"):
            value = getattr(self, name)
            if (value is not None or name != "batch_pairs") and (int(value) != value or value < 1):
                raise ConfigError(f"flow {name} must be an integer >= 1, got {value}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"flow cpu_threads must be >= 1 or None, got {self.cpu_threads}")
        if not 0 < self.scale_step < 1:
            raise ConfigError(f"flow scale_step must be in (0, 1), got {self.scale_step}")
        if self.median_filtering not in (0, 1, 3, 5):
            # OpenCV's medianBlur takes only 3 or 5 on float images; 0 or 1 switch it off
            raise ConfigError(f"flow median_filtering must be 0, 1, 3 or 5, got {self.median_filtering}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"flow device {self.device!r} is not a torch device: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(cfg: FlowConfig, like: object = None) -> torch.device:
    """cfg.device if set; else the device of a torch input; else cuda when available, else cpu."""
    if cfg.device is not None:
        return torch.device(cfg.device)
    if isinstance(like, torch.Tensor):
        return like.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# OpenCV reference


def tvl1_opencv(prev: np.ndarray | torch.Tensor, next: np.ndarray | torch.Tensor, cfg: FlowConfig = FlowConfig()) -> np.ndarray:
    """OpenCV-contrib DualTVL1 with cfg's parameters, pair by pair: (B, H, W) -> float32 (B, 2, H, W).

    The reference our `tvl1` is tested against, and the `opencv` backend. Inputs as for `tvl1`
    (0..255); float input is handed to OpenCV divided by 255, the scale it expects.
    """
    import cv2

    prev_np, next_np = (_as_numpy_batch(x, name) for x, name in ((prev, "prev"), (next, "next")))
    _check_pair_shapes(prev_np.shape, next_np.shape)
    out = np.empty((prev_np.shape[0], 2) + prev_np.shape[1:], np.float32)
    # a fresh object per call: OpenCV lowers its own nscales for small images and keeps it
    algo = cv2.optflow.DualTVL1OpticalFlow_create(
        tau=cfg.tau, lambda_=cfg.lambda_, theta=cfg.theta, nscales=cfg.nscales, warps=cfg.warps,
        epsilon=cfg.epsilon, innnerIterations=cfg.inner_iterations, outerIterations=cfg.outer_iterations,
        scaleStep=cfg.scale_step, gamma=cfg.gamma, medianFiltering=cfg.median_filtering, useInitialFlow=False,
    )
    for i, (a, b) in enumerate(zip(prev_np, next_np)):
        if a.dtype != np.uint8:
            a, b = (np.ascontiguousarray(x, dtype=np.float32) / np.float32(255) for x in (a, b))
        flow = algo.calc(a, b, None)  # (H, W, 2)
        out[i] = flow.transpose(2, 0, 1)
    return out


def _as_numpy_batch(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[None]
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return x


def _check_pair_shapes(a: tuple, b: tuple) -> None:
    if len(a) != 3 or a != b:
        raise FlowError(f"flow needs prev and next of equal shape (B, H, W), got {tuple(a)} and {tuple(b)}")
    if a[1] < 3 or a[2] < 3:
        raise FlowError(f"flow needs frames of at least 3x3 pixels, got {a[1]}x{a[2]}")


# ----------------------------------------------------------------------------------------------
# building blocks, all on (B, C, H, W) float32


def _level_sizes(height: int, width: int, cfg: FlowConfig) -> list[tuple[int, int]]:
    """Pyramid sizes, finest first, as OpenCV makes them (cvRound of size * scale_step)."""
    sizes = [(height, width)]
    for _ in range(1, cfg.nscales):
        h, w = sizes[-1]
        h, w = round(h * cfg.scale_step), round(w * cfg.scale_step)
        if h < _MIN_LEVEL_SIDE or w < _MIN_LEVEL_SIDE:
            break
        sizes.append((h, w))
    return sizes


@functools.lru_cache(maxsize=64)
def _linear_taps(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of cv::resize INTER_LINEAR along one axis (source = (dst + 0.5) * scale - 0.5,
    clamped to the edge)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src.astype(np.float32).astype(np.float64), 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, frac


def _resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """cv::resize(INTER_LINEAR) of (B, C, H, W) float32 to `size`, with source/destination `scale` per axis."""
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    for axis, n_in, n_out, s in ((-1, w_in, w_out, scale[1]), (-2, h_in, h_out, scale[0])):
        i0, i1, frac = (torch.from_numpy(a).to(x.device) for a in _linear_taps(n_in, n_out, s))
        shape = (n_out, 1) if axis == -2 else (n_out,)
        a, b = x.index_select(axis, i0), x.index_select(axis, i1)
        x = a + (b - a) * frac.view(shape)
    return x


def _centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's centeredGradient: 0.5 * (next - previous), the edge pixel standing in beyond the border."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    dx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    dy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return dx, dy


def _forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, 0 on the last column (x) and last row (y)."""
    dx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward differences with p = 0 before the first row and column (the adjoint of -_forward_gradient
    in the interior, as OpenCV computes it)."""
    return (px - F.pad(px[..., :, :-1], (1, 0, 0, 0))) + (py - F.pad(py[..., :-1, :], (0, 0, 1, 0)))


@functools.lru_cache(maxsize=4)
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i, j), i < j, after which wire n // 2 holds the median of n wires:
    Batcher's odd-even merge sort for the next power of two, minus the comparators that touch the
    missing wires (think +inf there: they never swap) or do not lead to the middle wire."""
    size = 1 << (n - 1).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {n // 2}, []
    for i, j in reversed([(i, j) for i, j in pairs if j < n]):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


def _median_blur(u: torch.Tensor, k: int) -> torch.Tensor:
    """k x k median of (B, C, H, W), border replicated (cv::medianBlur on float, exactly), by a
    min/max selection network over the k*k shifted images: elementwise only, so it is 4x faster
    than sorting unfolded windows on the CPU, and torch.compile fuses it into one kernel."""
    h, w = u.shape[-2:]
    r = k // 2
    p = F.pad(u, (r, r, r, r), mode="replicate")
    wires = [p[..., dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)]
    for i, j in _MEDIAN_NETWORKS[k]:
        wires[i], wires[j] = torch.minimum(wires[i], wires[j]), torch.maximum(wires[i], wires[j])
    return wires[k * k // 2]


_MEDIAN_NETWORKS = {k: _median_network(k * k) for k in (3, 5)}  # built here: compiled code only reads them


def _cubic_weights(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys cubic (A = -0.75) weights of the taps at offsets -1, 0, 1, 2 for fractions t in [0, 1)."""
    a = _CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    s = 1 - t
    w2 = ((a + 2) * s - (a + 3)) * s * s + 1
    return w0, w1, w2, 1 - w0 - w1 - w2


_TAP_FRAME = 4  # zeros around the image in the tap table: a window of clamped position never reaches the image


def _cubic_taps(img: torch.Tensor) -> torch.Tensor:
    """The table `_remap_cubic` samples, built once per pyramid level (its warps change only u):
    for each position of the image framed by _TAP_FRAME zeros, the 4 pixels from it rightwards
    in every channel, (B * Hp * Wp, C * 4), so that a row of bicubic taps is one contiguous read."""
    b, c, h, w = img.shape
    hp, wp = h + 2 * _TAP_FRAME, w + 2 * _TAP_FRAME
    flat = F.pad(F.pad(img, (_TAP_FRAME,) * 4).reshape(b, c, hp * wp), (0, 3))
    taps = torch.stack([flat[..., j : j + hp * wp] for j in range(4)], dim=-1)  # (B, C, Hp * Wp, 4)
    return taps.permute(0, 2, 1, 3).reshape(b * hp * wp, c * 4)


def _tap_positions(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where x + u falls in the tap table: the rows of its 4 tap rows (4 * B * H * W,), and the
    cubic weights (B, H, W, 4) along x and along y. floor(x) is clamped to [-3, W + 1] (and y
    likewise): beyond, every tap is outside the image, and the clamped window reads only zeros."""
    b, _, h, w = u.shape
    hp, wp = h + 2 * _TAP_FRAME, w + 2 * _TAP_FRAME
    xs = torch.arange(w, device=u.device, dtype=torch.float32).view(1, 1, w) + u[:, 0]  # (B, H, W)
    ys = torch.arange(h, device=u.device, dtype=torch.float32).view(1, h, 1) + u[:, 1]
    x0, y0 = torch.floor(xs), torch.floor(ys)
    wx, wy = torch.stack(_cubic_weights(xs - x0), -1), torch.stack(_cubic_weights(ys - y0), -1)
    # the tap at offset -1 is at floor - 1 + _TAP_FRAME in the framed image
    first = (y0.clamp(-3.0, h + 1.0) + (_TAP_FRAME - 1)) * wp + (x0.clamp(-3.0, w + 1.0) + (_TAP_FRAME - 1))
    rows = torch.arange(4, device=u.device).view(4, 1, 1, 1) * wp + torch.arange(b, device=u.device).view(1, b, 1, 1) * (hp * wp)
    return (first.to(torch.int64).unsqueeze(0) + rows).view(-1), wx, wy


def _sum_taps(g: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """The bicubic sum of gathered taps g (4, B, H, W, C, 4) -> (B, C, H, W): each row of 4 taps
    weighted along x, then the 4 rows along y."""
    wx = wx.unsqueeze(-2)
    out = None
    for i in range(4):
        row = wx[..., 0] * g[i, ..., 0] + wx[..., 1] * g[i, ..., 1] + wx[..., 2] * g[i, ..., 2] + wx[..., 3] * g[i, ..., 3]
        term = wy[..., i : i + 1] * row
        out = term if out is None else out + term
    return out.permute(0, 3, 1, 2).contiguous()


def _remap_cubic(taps: torch.Tensor, shape: torch.Size, u: torch.Tensor, kernels: _Kernels) -> torch.Tensor:
    """Sample the (B, C, H, W) image of `taps` (`_cubic_taps`) at (x + u[:, 0], y + u[:, 1])
    bicubically, taps outside the image reading 0 (cv::remap INTER_CUBIC with BORDER_CONSTANT 0);
    integer positions return the pixel exactly. The gather runs eagerly between the two kernels:
    compiled gathers were 2x slower on the CPU than index_select of the table's rows."""
    b, c, h, w = shape
    index, wx, wy = kernels.tap_positions(u)
    return kernels.sum_taps(taps.index_select(0, index).view(4, b, h, w, c, 4), wx, wy)


# ----------------------------------------------------------------------------------------------
# the iteration


def _tvl1_step(
    u: torch.Tensor,
    p: torch.Tensor,
    active: torch.Tensor,
    direction: torch.Tensor,
    inv_grad: torch.Tensor,
    rho_c: torch.Tensor,
    eps: torch.Tensor,
    l_t: float,
    theta: float,
    taut: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One inner iteration for the pairs still `active`; the others keep their values.

    u (B, C, H, W) flow (C = 2, or 3 with the illumination term), p (B, C, 2, H, W) dual variables,
    active (B,) bool, direction (B, C, H, W) = (I1wx, I1wy[, gamma]), inv_grad (B, 1, H, W) =
    1 / (I1wx^2 + I1wy^2) (huge where that is ~0), rho_c (B, 1, H, W) = I1w - I1wx u1 - I1wy u2 - I0
    at the warp, eps (1,) the stopping threshold. Returns the new (u, p, active): a pair turns
    inactive after the iteration in which sum (u_new - u)^2 <= eps.
    """
    # thresholding step, v = u + coef * direction: OpenCV's three cases are coef = l_t where
    # rho < -l_t |grad|^2, -l_t where rho > l_t |grad|^2, else -rho / |grad|^2, i.e. a clamp
    rho = rho_c + direction[:, 0:1] * u[:, 0:1] + direction[:, 1:2] * u[:, 1:2]
    if u.shape[1] == 3:
        rho = rho + direction[:, 2:3] * u[:, 2:3]
    coef = (-rho * inv_grad).clamp(-l_t, l_t)
    v = u + coef * direction
    # primal step u = v + theta div p (rounded in OpenCV's order)
    u_new = v + theta * _divergence(p[:, :, 0], p[:, :, 1])
    err = (u_new - u).square().sum(dim=(1, 2, 3))
    # dual step
    ux, uy = _forward_gradient(u_new)
    ng = 1.0 + taut * torch.sqrt(ux * ux + uy * uy)
    p_new = (p + taut * torch.stack((ux, uy), dim=2)) / ng.unsqueeze(2)
    keep = active.view(-1, 1, 1, 1)
    return torch.where(keep, u_new, u), torch.where(keep.unsqueeze(-1), p_new, p), active & (err > eps)


def _tvl1_steps(n: int, *args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n inner iterations (`_tvl1_step(*args)`) in one call. The result is the same as n calls':
    a pair that stops in the first keeps its values in the others. A compiled call on the CPU
    costs ~45 us besides its arithmetic, as much as an iteration at 53x70, so the CPU path runs
    two per call (~10 % of a pair's time at 128x170)."""
    u, p, active, *rest = args
    for _ in range(n):
        u, p, active = _tvl1_step(u, p, active, *rest)
    return u, p, active


def _median_step(u: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
    """Median filter of (u1, u2) for the active pairs (the start of an outer iteration)."""
    if u.device.type == "cpu":
        return _median_step_opencv(u, active, k)
    filtered = _median_blur(u[:, :2], k)
    if u.shape[1] == 3:
        filtered = torch.cat((filtered, u[:, 2:]), dim=1)
    return torch.where(active.view(-1, 1, 1, 1), filtered, u)


def _median_step_opencv(u: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
    """_median_step on the CPU by cv::medianBlur, image by image. A median selects a value and
    rounds nothing, so this equals our network exactly; it is 16x faster than the network compiled
    (1.0 against 16 ms for the two channels of a 256x455 field, one thread)."""
    import cv2

    u = u.contiguous()
    out = u.clone()
    src, dst = u.numpy(), out.numpy()
    for b in np.flatnonzero(active.numpy()):
        for c in range(2):
            dst[b, c] = cv2.medianBlur(src[b, c], k)
    return out


@dataclass(frozen=True)
class _Kernels:
    step: object  # _tvl1_steps or its compiled form
    median: object  # _median_step or its compiled form
    tap_positions: object  # _tap_positions or its compiled form
    sum_taps: object  # _sum_taps or its compiled form
    compiled: bool


_EAGER = _Kernels(_tvl1_steps, _median_step, _tap_positions, _sum_taps, compiled=False)


@functools.lru_cache(maxsize=2)
def _compiled_kernels(device_type: str) -> _Kernels:
    """torch.compile of the step, of the warp's arithmetic and, off the CPU, of the median (its
    min/max network becomes one loop), with dynamic shapes, so that one compilation serves every
    pyramid level and batch size."""
    compiled = functools.partial(torch.compile, dynamic=True)
    median = _median_step if device_type == "cpu" else compiled(_median_step)  # CPU: OpenCV's, nothing to compile
    return _Kernels(compiled(_tvl1_steps), median, compiled(_tap_positions), compiled(_sum_taps), compiled=True)


_fast_failed: str | None = None  # why the automatic fast path fell back to eager in this process


class _GraphedOuterIteration:
    """One outer iteration (median + inner iterations) at one level shape, captured as a CUDA graph.

    The state lives in static tensors: the caller fills them (u and p per level; direction, inv_grad,
    rho_c and active per warp), `graph.replay()` runs median + inner iterations and writes the new
    u, p and active back into them. The host syncs once per outer iteration (`active.any()`).
    Warm-up (compilation) runs on a side stream before the capture, as CUDA graphs require.
    """

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, cfg: FlowConfig, kernels: _Kernels) -> None:
        b, c, h, w = shape
        zeros = functools.partial(torch.zeros, device=device, dtype=torch.float32)
        self.u, self.p = zeros(b, c, h, w), zeros(b, c, 2, h, w)
        self.direction, self.inv_grad, self.rho_c = zeros(b, c, h, w), zeros(b, 1, h, w), zeros(b, 1, h, w)
        self.eps = zeros(1)
        self.active = torch.ones(b, dtype=torch.bool, device=device)
        self._cfg, self._kernels = cfg, kernels
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile and warm up outside the capture
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()

    def _body(self) -> None:
        cfg, k = self._cfg, self._kernels
        u, p, active = self.u, self.p, self.active
        if cfg.median_filtering > 1:
            u = k.median(u, active, cfg.median_filtering)
        l_t, theta, taut = _scalars(cfg)
        for _ in range(cfg.inner_iterations):
            u, p, active = k.step(1, u, p, active, self.direction, self.inv_grad, self.rho_c, self.eps, l_t, theta, taut)
        self.u.copy_(u)
        self.p.copy_(p)
        self.active.copy_(active)


@functools.lru_cache(maxsize=32)
def _graphed(shape: tuple[int, int, int, int], device: torch.device, cfg: FlowConfig) -> _GraphedOuterIteration:
    return _GraphedOuterIteration(shape, device, cfg, _compiled_kernels(device.type))


def _scalars(cfg: FlowConfig) -> tuple[float, float, float]:
    """lambda * theta, theta, tau / theta, rounded to float32 as OpenCV does."""
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    return f32(cfg.lambda_ * cfg.theta), f32(cfg.theta), f32(cfg.tau / cfg.theta)


def _one_scale(i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, cfg: FlowConfig, kernels: _Kernels) -> tuple[torch.Tensor, int]:
    """Warps and iterations at one pyramid level; i0, i1 (B, 1, H, W), u (B, C, H, W). Returns u and
    the number of inner iterations the slowest pair ran in its slowest warp (counted in whole
    calls of the step, so up to _STEPS_PER_CALL - 1 more outside CUDA graphs)."""
    b, c, h, w = u.shape
    device = u.device
    l_t, theta, taut = _scalars(cfg)
    eps = torch.tensor([np.float32(cfg.epsilon * cfg.epsilon * h * w)], device=device)
    graph = _graphed((b, c, h, w), device, _numeric(cfg)) if kernels.compiled and device.type == "cuda" else None
    if graph is not None:
        graph.u.copy_(u)
        graph.p.zero_()
        graph.eps.copy_(eps)
        u = graph.u
    else:
        p = torch.zeros(b, c, 2, h, w, device=device, dtype=torch.float32)
    i1x, i1y = _centered_gradient(i1)
    stack = torch.cat((i1, i1x, i1y), dim=1)  # (B, 3, H, W)
    taps = _cubic_taps(stack)
    most = 0
    for _ in range(cfg.warps):
        warped = _remap_cubic(taps, stack.shape, u[:, :2], kernels)
        i1w, i1wx, i1wy = warped[:, 0:1], warped[:, 1:2], warped[:, 2:3]
        grad = i1wx * i1wx + i1wy * i1wy
        inv_grad = torch.where(grad > _FLT_EPSILON, 1.0 / grad, torch.full_like(grad, _HUGE))
        rho_c = i1w - i1wx * u[:, 0:1] - i1wy * u[:, 1:2] - i0
        direction = torch.cat((i1wx, i1wy) + ((torch.full_like(i1wx, cfg.gamma),) if c == 3 else ()), dim=1)
        iterations = 0
        if graph is not None:
            graph.direction.copy_(direction)
            graph.inv_grad.copy_(inv_grad)
            graph.rho_c.copy_(rho_c)
            graph.active.fill_(True)
            for _ in range(cfg.outer_iterations):
                graph.graph.replay()
                iterations += cfg.inner_iterations
                if not bool(graph.active.any()):
                    break
        else:
            active = torch.ones(b, dtype=torch.bool, device=device)
            check_each = device.type == "cpu"  # a host sync per call costs nothing on the CPU
            for _ in range(cfg.outer_iterations):
                if cfg.median_filtering > 1:
                    u = kernels.median(u, active, cfg.median_filtering)
                done = 0
                while done < cfg.inner_iterations:
                    n = min(_STEPS_PER_CALL, cfg.inner_iterations - done)
                    u, p, active = kernels.step(n, u, p, active, direction, inv_grad, rho_c, eps, l_t, theta, taut)
                    done += n
                    if check_each and not bool(active.any()):
                        break
                iterations += done
                if not bool(active.any()):
                    break
        most = max(most, iterations)
    return (graph.u.clone() if graph is not None else u), most


def _numeric(cfg: FlowConfig) -> FlowConfig:
    """cfg with the fields that do not change the numbers cleared (a cache key)."""
    return dataclasses.replace(cfg, device=None, fast=None, batch_pairs=1, cpu_threads=None)


def _kernels_for(cfg: FlowConfig, device: torch.device) -> _Kernels:
    """Eager when asked, or when the automatic fast path failed before in this process."""
    if cfg.fast is False or (cfg.fast is None and _fast_failed is not None):
        return _EAGER
    return _compiled_kernels(device.type)


def _as_tensor_batch(x: np.ndarray | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim == 2:
        t = t[None]
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise FlowError(f"flow {name} frames must be uint8 or float, got {t.dtype}")
    return t.to(device=device, dtype=torch.float32)


@torch.inference_mode()
def tvl1(prev: np.ndarray | torch.Tensor, next: np.ndarray | torch.Tensor, cfg: FlowConfig = FlowConfig()) -> torch.Tensor:
    """TV-L1 flow from `prev` to `next`: grayscale (B, H, W) 0..255 (uint8 or float; (H, W) is one pair)
    -> float32 (B, 2, H, W) pixels, (x, y) order, on the device of `resolve_device(cfg, prev)`."""
    global _fast_failed
    device = resolve_device(cfg, prev)
    i0 = _as_tensor_batch(prev, "prev", device)
    i1 = _as_tensor_batch(next, "next", device)
    _check_pair_shapes(tuple(i0.shape), tuple(i1.shape))
    kernels = _kernels_for(cfg, device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if kernels.compiled and cfg.fast is None:
            try:
                return _solve(i0, i1, cfg, kernels)
            except torch._dynamo.exc.TorchDynamoException as e:  # no C++ compiler, no Triton, ...
                _fast_failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                log.warning("flow: the compiled path failed (%s); this process uses the eager path", _fast_failed)
                kernels = _EAGER
        return _solve(i0, i1, cfg, kernels)


def _solve(i0: torch.Tensor, i1: torch.Tensor, cfg: FlowConfig, kernels: _Kernels) -> torch.Tensor:
    """Coarse to fine over the pyramid; i0, i1 float32 (B, H, W) on the device."""
    b, h, w = i0.shape
    sizes = _level_sizes(h, w, cfg)
    pyramid = [(i0[:, None], i1[:, None])]
    for size in sizes[1:]:
        scale = (1.0 / cfg.scale_step, 1.0 / cfg.scale_step)
        pyramid.append(tuple(_resize_linear(x, size, scale) for x in pyramid[-1]))
    channels = 3 if cfg.gamma != 0 else 2
    u = torch.zeros(b, channels, *sizes[-1], device=i0.device, dtype=torch.float32)
    for level in range(len(sizes) - 1, -1, -1):
        u, iterations = _one_scale(*pyramid[level], u, cfg, kernels)
        log.debug("level %d %s: at most %d inner iterations in a warp", level, sizes[level], iterations)
        if level == 0:
            break
        (h_s, w_s), (h_f, w_f) = sizes[level], sizes[level - 1]
        u = _resize_linear(u, (h_f, w_f), (h_s / h_f, w_s / w_f))
        u[:, :2] *= float(np.float32(1.0 / cfg.scale_step))  # the illumination channel is not a displacement
    return u[:, :2].contiguous()


# ----------------------------------------------------------------------------------------------
# videos


def compute_flow(gray_frames: np.ndarray, cfg: FlowConfig = FlowConfig()) -> np.ndarray:
    """Flow between consecutive frames: uint8 (T, H, W) -> float32 (T-1, H, W, 2) pixels, (x, y),
    field t from frame t to t+1; pairs are solved cfg.batch_pairs at a time with cfg.backend.

    With CUDA graphs, a short batch is padded (repeating its last pair) to a power of two or to the
    batch size, so that videos of any length reuse a few captured graphs.
    """
    frames = np.asarray(gray_frames)
    if frames.ndim != 3:
        raise FlowError(f"compute_flow needs grayscale frames (T, H, W), got shape {frames.shape}")
    t, h, w = frames.shape
    out = np.empty((max(t - 1, 0), h, w, 2), np.float32)
    device = resolve_device(cfg) if cfg.backend == "torch" else None
    graphs = device is not None and device.type == "cuda" and cfg.fast is not False
    batch = cfg.batch_pairs or (_CUDA_BATCH_PAIRS if device is not None and device.type == "cuda" else 1)
    for start in range(0, t - 1, batch):
        stop = min(start + batch, t - 1)
        if cfg.backend == "opencv":
            flow = tvl1_opencv(frames[start:stop], frames[start + 1 : stop + 1], cfg)
        else:
            index = np.arange(start, stop)
            if graphs:
                index = np.concatenate([index, np.full(_graph_batch(len(index), batch) - len(index), stop - 1)])
            pairs = torch.from_numpy(np.stack([frames[index], frames[index + 1]])).to(device)  # (2, B, H, W)
            flow = tvl1(pairs[0], pairs[1], cfg)[: stop - start].cpu().numpy()
        out[start:stop] = flow.transpose(0, 2, 3, 1)
    return out


def _graph_batch(n: int, limit: int) -> int:
    """The batch size a batch of n pairs is padded to for CUDA graphs: the next power of two, at most limit."""
    return min(1 << (n - 1).bit_length(), limit)


class FlowPredictor:
    """TV-L1 for a Ray actor: `__init__` picks the device once; `__call__` takes a video chunk.

    frames: uint8 (T, H, W) grayscale or (T, H, W, 3) RGB -> float32 (T-1, H, W, 2) pixels.
    Testable without Ray.
    """

    def __init__(self, cfg: FlowConfig = FlowConfig()) -> None:
        device = resolve_device(cfg) if cfg.backend == "torch" else torch.device("cpu")
        self.cfg = dataclasses.replace(cfg, device=str(device))
        if device.type == "cpu" and cfg.cpu_threads is not None:
            import cv2  # the opencv backend, and the torch backend's median on the CPU

            torch.set_num_threads(cfg.cpu_threads)
            cv2.setNumThreads(cfg.cpu_threads)
        log.info("flow: backend %s on %s (fast=%s)", cfg.backend, device, cfg.fast)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
            raise FlowError(f"flow needs uint8 (T, H, W) or (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        gray = conventions.rgb_to_gray(frames) if frames.ndim == 4 else frames
        return compute_flow(gray, self.cfg)
