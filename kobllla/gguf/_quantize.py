"""``python -m kobllla.gguf._quantize IN OUT FTYPE NTHREAD``: llama.cpp's quantizer via llama-cpp-python.

Run as a child process of an export so that llama.cpp's log goes to the export's log file and a
crash inside llama.cpp cannot take the exporting process down. ``FTYPE`` is a ``llama_ftype``
number from llama.cpp's ``include/llama.h`` (e.g. 15 = ``LLAMA_FTYPE_MOSTLY_Q4_K_M``).
"""

from __future__ import annotations

import sys


def quantize(src: str, dst: str, ftype: int, nthread: int) -> int:
    """Calls ``llama_model_quantize``; returns its status (0 = success)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python -m kobllla.gguf._quantize IN OUT FTYPE NTHREAD")
    src_path, dst_path, ftype_num, threads = sys.argv[1:]
    sys.exit(quantize(src_path, dst_path, int(ftype_num), int(threads)))
