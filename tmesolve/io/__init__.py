"""Run files: the HDF5 writer with checkpoint, the XDMF sidecar and the reader.

``tmesolve.open`` is :func:`open_run`.
"""

from tmesolve.io.hdf5 import (
    RUN_FILE_NAME,
    SCHEMA_VERSION,
    FieldSpec,
    RunFileError,
    RunWriter,
    SchemaVersionError,
)
from tmesolve.io.reader import RunData, open_run
from tmesolve.io.xdmf import write_xdmf

__all__ = [
    "RUN_FILE_NAME",
    "SCHEMA_VERSION",
    "FieldSpec",
    "RunData",
    "RunFileError",
    "RunWriter",
    "SchemaVersionError",
    "open_run",
    "write_xdmf",
]
