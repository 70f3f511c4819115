"""Chat vector (stage 2): ``out = target + ratio * (instruct - base)``, streamed and exact.

Every output element is ``dtype(fp32(target) + ratio * (fp32(instruct) - fp32(base)))``:
inputs are widened to float32, the arithmetic is done in float32 in that order (difference,
then scale, then add), and the result is rounded once to the output dtype. The tensors are
streamed slice by slice (``chunk_elements`` at a time) from the three inputs into output
shards whose headers are laid out up front, so memory stays at a few slice buffers whatever
the model's size (safetensors inputs; torch pickles are memory-mapped a tensor at a time). The
arithmetic is numpy's float32 (bit-identical to torch's); with safetensors inputs, the common
case, torch is never imported, so no time goes to that import before the first read.

Before anything is written, the three checkpoints are checked against each other: same
architecture fields in their configs, same tensor names, same shapes, floating dtypes, intact
files, and a vocabulary policy when the target's embedding rows differ. Values are checked as
they stream: a NaN or Inf in any input, or a result outside the output dtype's range, stops
the run and removes the temporary directory, so nothing appears at ``out``.

The ChatVector paper's extract/add split is :func:`extract_chat_vector` (saves
``instruct - base`` in float32 by default, so a later :func:`apply_chat_vector` gives the same
bits as :func:`merge_chat_vector`) and :func:`apply_chat_vector`. All three take one
:class:`ChatVectorOptions`.

Modules: :mod:`.checks` (everything checked before writing, and the tensor plans),
:mod:`.streaming` (slices computed and hashed by worker threads, written in order),
:mod:`.files` (config/tokenizer files and the manifest's parts), :mod:`.api` (the entry points).
"""

from kobllla.chat_vector.api import (
    FORMULA,
    ChatVectorOptions,
    ChatVectorResult,
    apply_chat_vector,
    default_workers,
    extract_chat_vector,
    merge_chat_vector,
    open_vector,
)
from kobllla.chat_vector.checks import (
    ARCH_DEFAULTS,
    EMBEDDING_POLICIES,
    OUT_DTYPES,
    VOCAB_TENSORS,
    EmbeddingPolicy,
    OutDtype,
    Segment,
    TensorPlan,
    VectorDtype,
    architecture,
    check_floating,
    check_output_path,
    check_same_architecture,
    check_same_tensors,
    check_vector_shapes,
    plan_tensors,
)
from kobllla.chat_vector.files import MANIFEST_NAME, copy_model_files, describe_input

__all__ = [
    "ARCH_DEFAULTS", "EMBEDDING_POLICIES", "FORMULA", "MANIFEST_NAME", "OUT_DTYPES", "VOCAB_TENSORS",
    "ChatVectorOptions", "ChatVectorResult", "EmbeddingPolicy", "OutDtype", "Segment", "TensorPlan", "VectorDtype",
    "apply_chat_vector", "architecture", "check_floating", "check_output_path", "check_same_architecture",
    "check_same_tensors", "check_vector_shapes", "copy_model_files", "default_workers", "describe_input",
    "extract_chat_vector", "merge_chat_vector", "open_vector", "plan_tensors",
]
