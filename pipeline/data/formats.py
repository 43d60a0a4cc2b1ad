"""The shard formats: each name maps to the module that loads it (the writer still branches on the name).

A new loader format is one loader module and one line in `FORMATS`. A loader module
provides `train_batches(cfg, section, augment) -> (blocks, batches)` and `val_batches(cfg, section)`
(`section`: the format's part of the split's manifest section; `blocks`: the sample-index blocks the
epoch shuffle keeps together, or None); see `pipeline.data.load.loader`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    loader: str  # module under pipeline.data.load

    def load_module(self):
        return importlib.import_module(self.loader)


FORMATS = {
    "wds": Format(loader="pipeline.data.load.wds"),
    "ffcv": Format(loader="pipeline.data.load.ffcv"),
}
