"""The WebDataset shard writer: `<key>.<ext>` + `<key>.cls` tar members with fixed metadata."""

from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.data.convert.outputs import HashingFile

TAR_MTIME = 0


class TarWriter(HashingFile):
    """A WebDataset shard with fixed member metadata, so its bytes depend only on its samples."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.num_samples = 0

    def add(self, key: str, ext: str, data: bytes, label: int) -> None:
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.cls", str(label).encode("ascii"))
        self.num_samples += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), TAR_MTIME, 0o644, 0, 0
        info.uname = info.gname = ""
        self.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self.write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self.write(bytes(tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def commit(self) -> None:
        end = self.bytes + 2 * tarfile.BLOCKSIZE
        self.write(bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        super().commit()
