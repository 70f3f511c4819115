"""Generation from any stage's output: batch files (``tools.generate``) and a terminal chat (``tools.chat``).

    from kobllla.generation import GenerationOptions, generate_file, load_model, generate_rows, read_prompts

    summary = generate_file(model=Path("runs/demo/stage3/epoch_0"), prompts=Path("eval/prompts/ko.jsonl"),
                            out=Path("runs/answers.jsonl"), options=GenerationOptions(max_new_tokens=64))

    loaded = load_model(Path("checkpoints/Llama-3-KoBLLa-ChatVec"), device="cuda")
    for row in generate_rows(loaded, read_prompts(Path("prompts.jsonl")), GenerationOptions(batch_size=32)):
        print(row["id"], row["stop_reason"], row["text"])
"""

from kobllla.generation._chat import ChatSession, chat_loop
from kobllla.generation._flags import add_generation_flags, options_from_args
from kobllla.generation._generate import (
    Decoded,
    GenerateSummary,
    GenerationOptions,
    LoadedModel,
    decode,
    encode_row,
    generate_file,
    generate_rows,
    load_model,
    row_seed,
)
from kobllla.generation._prompts import ROLES, check_messages, check_row, read_prompts, row_key

__all__ = [
    "ROLES",
    "ChatSession",
    "add_generation_flags",
    "chat_loop",
    "options_from_args",
    "Decoded",
    "GenerateSummary",
    "GenerationOptions",
    "LoadedModel",
    "check_messages",
    "check_row",
    "decode",
    "encode_row",
    "generate_file",
    "generate_rows",
    "load_model",
    "read_prompts",
    "row_key",
    "row_seed",
]
