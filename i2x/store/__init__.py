"""The run on disk: :class:`RunStore` (manifest, probe, checkpoints, every stage's records), the
one-writer lock, and atomic writes (``docs/run-format.md``)."""

from i2x.store.atomic import atomic_save_tensors, atomic_write_bytes, atomic_write_json
from i2x.store.lock import RunLockedError
from i2x.store.runstore import (
    FORMAT,
    FORMAT_VERSION,
    RunStore,
    RunStoreError,
    open_run,
    read_json_file,
    read_record,
)

__all__ = ["RunStore", "RunStoreError", "RunLockedError", "FORMAT", "FORMAT_VERSION", "open_run", "read_json_file",
           "read_record", "atomic_write_bytes", "atomic_write_json", "atomic_save_tensors"]
