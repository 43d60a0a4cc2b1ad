"""The shard formats: each name maps to its writer module (convert side) and its loader module (load side).

A new format is one writer module, one loader module and one line in `FORMATS`.

A writer module (`pipeline.data.convert.tar`, `.beton`) provides: `NAME` (its folder under OUT),
`STALE_GLOB` (its file names there), `check(opts)` (one-line errors for bad options),
`plan(split, order, opts) -> [Output]` (the split's output files, each a contiguous run of `order`),
`needs_pixels(opts)`, `encode(data, im, key, opts) -> (payload, note)` (in a worker),
`open_output(out, output, opts)` (a writer with `put(key, label, payload)`, `finish() -> (samples,
bytes, sha256)` and `abort()`), `section(outputs, records)` (its manifest section), and optionally
`preload()` (imports the forked workers should inherit). `pipeline.data.convert.shards` drives them.

A loader module provides `train_batches(cfg, section, augment, label_maps) -> (blocks, batches)` and
`val_batches(cfg, section)` (`section`: the format's part of the split's manifest section; `blocks`:
the sample-index blocks the epoch shuffle keeps together, or None); see `pipeline.data.load.loader`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    writer: str  # module under pipeline.data.convert
    loader: str  # module under pipeline.data.load

    def writer_module(self):
        return importlib.import_module(self.writer)

    def load_module(self):
        return importlib.import_module(self.loader)


FORMATS = {
    "wds": Format(writer="pipeline.data.convert.tar", loader="pipeline.data.load.wds"),
    "ffcv": Format(writer="pipeline.data.convert.beton", loader="pipeline.data.load.ffcv"),
}
