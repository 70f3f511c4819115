"""Checkpoint input and output, one tensor (or one slice of a tensor) at a time.

Reading (:func:`open_checkpoint`) takes any of the layouts a Llama 3 checkpoint comes in and
presents it under Hugging Face tensor names:

- a Hugging Face directory: ``model.safetensors``, or shards listed by
  ``model.safetensors.index.json`` (torchtune's ``epoch_N/`` output is this layout);
- torch pickles: ``pytorch_model.bin`` (+ ``pytorch_model.bin.index.json``), Meta's
  ``consolidated.00.pth`` (Meta names, q/k rows permuted into HF order with ``params.json``),
  and torchtune's Meta-format ``epoch_N/model-00001-of-00001.bin``. They are loaded with
  ``weights_only=True`` (no arbitrary objects are unpickled) and ``mmap=True``.

Safetensors files are read with ``os.preadv`` into a caller's buffer rather than through
mmap, so resident memory stays at the size of that buffer however large the model is. Reading
and writing safetensors needs numpy and the stdlib only: dtypes are :class:`DType` (torch's
names, no torch), and torch is imported only for pickles or a caller that wants torch tensors.

Writing: :class:`StreamingSafetensorsWriter` lays out all shards up front from the tensor
names, dtypes and shapes, writes each shard's header first and then streams tensor bytes
straight to disk in slices; :class:`ShardedSafetensorsWriter` buffers whole tensors up to a
shard's size (for small models made in memory). Outputs are built in a hidden temporary
sibling (``.NAME.tmp-PID``) by :func:`atomic_output_dir` and renamed into place only when
complete, so a killed job never leaves a directory that looks finished.

One module per concern: :mod:`.layout` (file names, dtype codes), :mod:`.read`,
:mod:`.write`, :mod:`.meta_names` (Meta -> Hugging Face tensor names) and :mod:`.hashing`.
"""

from kobllla.atomic import atomic_output_dir, write_json
from kobllla.checkpoint_io.hashing import SequentialHasher
from kobllla.checkpoint_io.layout import (
    BIN_INDEX_NAME,
    BIN_SINGLE_NAME,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    CheckpointFormat,
    DType,
    TensorInfo,
    as_dtype,
)
from kobllla.checkpoint_io.meta_names import meta_to_hf_name, permute_meta_to_hf
from kobllla.checkpoint_io.read import Checkpoint, open_checkpoint, read_safetensors_header
from kobllla.checkpoint_io.write import (
    PlannedShard,
    ShardedSafetensorsWriter,
    StreamingSafetensorsWriter,
    plan_shards,
    shard_name,
)

__all__ = [
    "BIN_INDEX_NAME", "BIN_SINGLE_NAME", "INDEX_NAME", "SAFETENSORS_DTYPES", "SINGLE_NAME", "Checkpoint",
    "CheckpointFormat", "DType", "PlannedShard", "SequentialHasher", "ShardedSafetensorsWriter",
    "StreamingSafetensorsWriter", "TensorInfo", "as_dtype", "atomic_output_dir", "meta_to_hf_name",
    "open_checkpoint", "permute_meta_to_hf", "plan_shards", "read_safetensors_header", "shard_name",
    "write_json",  # re-exported for old callers; new code imports it from the torch-free kobllla.atomic
]
