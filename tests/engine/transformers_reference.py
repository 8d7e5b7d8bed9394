"""transformers' greedy continuations on the real GGUF models, recorded or computed.

Loading a GGUF in transformers parses its metadata three times and dequantizes every tensor with
gguf-py (the 1.5B: about two minutes on two cores, before its 48 fp32 tokens), so the parity tests
read transformers' tokens from `transformers_reference.json` when the record was made from the very
same inputs: the file's sha256, transformers' version, the prompt ids and the number of tokens. Any
difference (another file, an upgraded transformers, a new prompt) and the fixture runs transformers
itself, as before. The record is transformers' own output; nothing in it comes from our engine.

Rewrite it (after changing prompts, models or transformers) with
`python -m tests.engine.transformers_reference`, which runs transformers on every model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os

import torch

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transformers_reference.json")


def sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def inputs_key(path: str, prompts: list[list[int]], chats: list[list[int]], num_tokens: int,
               eos_token_id: int | None) -> dict:
    """What the reference is a function of."""
    import transformers

    return {"sha256": sha256(path), "transformers": transformers.__version__, "num_tokens": num_tokens,
            "eos_token_id": eos_token_id, "prompts": prompts, "chats": chats}


def reference(name: str, path: str, prompts: list[list[int]], num_tokens: int, chats: list[list[int]] = (),
              eos_token_id: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' tokens for `prompts` (exactly num_tokens each) and `chats` (up to num_tokens,
    stopping at eos_token_id): recorded when the record's inputs equal these, else computed."""
    key = inputs_key(path, [list(p) for p in prompts], [list(c) for c in chats], num_tokens, eos_token_id)
    record = _read().get(name)
    if record is not None and record["inputs"] == key:
        return record["tokens"], record["chat_replies"]
    return hf_greedy_batch(path, prompts, num_tokens, chats, eos_token_id)


def hf_greedy_batch(path: str, prompts: list[list[int]], num_tokens: int, chats: list[list[int]] = (),
                    eos_token_id: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' greedy continuations (fp32, the GGUF dequantized by transformers), one prompt at a
    time: exactly num_tokens for `prompts`; up to num_tokens, stopping at eos_token_id (the file's EOS,
    where the engine stops), for `chats`."""
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

    def generate(ids: list[int], force: bool) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=num_tokens, do_sample=False, pad_token_id=0,
                                 min_new_tokens=num_tokens if force else None,
                                 eos_token_id=None if force else eos_token_id)
        return out[0, len(ids):].tolist()

    outputs = [generate(ids, True) for ids in prompts], [generate(ids, False) for ids in chats]
    del model
    gc.collect()
    return outputs


def _read() -> dict:
    if not os.path.isfile(RECORD):
        return {}
    with open(RECORD) as file:
        return json.load(file)


def record_all() -> None:
    """Run transformers on every model of the parity tests and write the record."""
    from tests.engine.test_real_models import MODELS, NUM_TOKENS, model_inputs

    records = {}
    for name in sorted(MODELS):
        path, tokenizer, prompts, chats = model_inputs(name)
        eos = tokenizer.eos_token_id
        tokens, chat_replies = hf_greedy_batch(path, prompts, NUM_TOKENS, chats, eos)
        records[name] = {"inputs": inputs_key(path, prompts, chats, NUM_TOKENS, eos), "tokens": tokens,
                         "chat_replies": chat_replies}
        print(f"{name}: {tokens} {chat_replies}", flush=True)
    with open(RECORD, "w") as file:
        json.dump(records, file, indent=1)
        file.write("\n")


if __name__ == "__main__":
    record_all()
