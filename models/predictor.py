"""`I3DPredictor`: the I3D of `quovadis extract` as a plain class, for a Ray actor (or no Ray at all).

`__init__` loads the model of each asked stream once, on its device; `__call__` takes a batch of
clips as a dict of numpy arrays, converts them through `pipeline.conventions` (the one place that
knows the value ranges), runs under `torch.inference_mode()` and autocast per `precision`, and
returns numpy arrays with the clip ids passed through:

    in   clip_id  (N,) int64
         rgb      uint8 (N, T, H, W, 3)                       (with "rgb" in streams)
         flow     uint8 quantised or float pixels (N, T, H, W, 2), (x, y)   (with "flow")
    out  clip_id  (N,) as given
         rgb, flow                 float32 (N, 1024) features (time-averaged AvgPool output)
         logits_rgb, logits_flow   float32 (N, classes)        (with `logits`)
         logits                    float32 (N, classes), the streams' sum (the released joint model)

A stream not in `streams` is neither loaded nor run: an RGB-only predictor never opens flow weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from quovadis.models.fast import PRECISIONS, FastI3D, InferenceConfig
from quovadis.models.weights import STREAMS, load_i3d
from quovadis.pipeline import conventions
from quovadis.pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictorConfig:
    """What the predictor loads and how it runs. Weights are resolved paths (models.weights.resolve_weights)."""

    streams: tuple[str, ...] = STREAMS
    weights_rgb: str | None = None
    weights_flow: str | None = None
    precision: str = "fp32"  # autocast dtype: fp32 (none), bf16, fp16
    device: str | None = None  # None: cuda when available, else cpu
    logits: bool = False
    num_threads: int | None = None  # torch CPU threads (None: leave torch's default)

    def __post_init__(self) -> None:
        if not self.streams or set(self.streams) - set(STREAMS) or len(set(self.streams)) != len(self.streams):
            raise ConfigError(f"streams must be rgb, flow or rgb,flow, got {','.join(self.streams)!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")


class I3DPredictor:
    """Clip batches -> I3D features (and logits); see the module docstring for the batch layout."""

    def __init__(self, cfg: PredictorConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        weights = {"rgb": cfg.weights_rgb, "flow": cfg.weights_flow}
        # the path `quovadis bench i3d` measures: BN folded, channels_last_3d, autocast per precision
        fast = InferenceConfig(dtype=PRECISIONS[cfg.precision])
        self.models = {s: FastI3D(load_i3d(s, weights[s]), self.device, fast) for s in STREAMS if s in cfg.streams}
        log.info("I3D predictor on %s (pid %d): streams %s, precision %s", self.device, os.getpid(),
                 ",".join(self.models), cfg.precision)  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"clip_id": np.asarray(batch["clip_id"])}
        summed = None
        with torch.inference_mode():
            for stream, model in self.models.items():
                if stream not in batch:
                    raise ConfigError(f"the batch has no {stream!r} clips (keys: {sorted(batch)})")
                to_model = conventions.rgb_to_model if stream == "rgb" else conventions.flow_to_model
                x = to_model(batch[stream]).to(self.device, non_blocking=True)  # (N, C, T, H, W)
                if x.shape[0] != len(out["clip_id"]):
                    raise ValueError(f"{stream}: {x.shape[0]} clips for {len(out['clip_id'])} clip ids")
                features, logits = model(x)  # float32 (N, 1024), (N, classes)
                out[stream] = features.cpu().numpy()
                if self.cfg.logits:
                    out[f"logits_{stream}"] = logits.cpu().numpy()
                    summed = logits if summed is None else summed + logits
        if summed is not None:
            out["logits"] = summed.cpu().numpy()
        return out
