"""GGUF export, verification and quantization reports, through llama.cpp's own code.

- :func:`export_gguf`: any stage's output -> ``OUTDIR/<name>-<quant>.gguf`` + manifest
  (llama.cpp's ``convert_hf_to_gguf.py`` and its quantizer).
- :func:`find_llama_cpp` / :func:`install_llama_cpp`: where that code comes from.
- :func:`read_gguf_info`: tokenizer pre-tag, eos, chat template and tensor types of a file.
- :mod:`kobllla.gguf.report`: perplexity, KL and top-1 agreement of each quant, per language.
"""

from kobllla.gguf.export import MANIFEST, QUANTS, export_gguf, parse_quants
from kobllla.gguf.gguf_info import GGUFInfo, read_gguf_info
from kobllla.gguf.locate import LlamaCpp, find_llama_cpp, install_llama_cpp

__all__ = ["MANIFEST", "QUANTS", "GGUFInfo", "LlamaCpp", "export_gguf", "find_llama_cpp", "install_llama_cpp",
           "parse_quants", "read_gguf_info"]
