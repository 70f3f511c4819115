"""kobllla: teach an English-first Llama 3 a second language without losing its English.

Stages (see README.md): 1. LoRA continued pretraining on Korean text, 2. chat vector,
3. LoRA instruction tuning on KoLIMA/BiLIMA, 4. lm-eval gates.
"""

__version__ = "0.1.0"
