"""Convert a GGUF checkpoint into a bf16 Hugging Face directory (for vLLM).

Run with the *peer's* interpreter, not ScaleLLM's, because it needs the
peer environment's transformers, gguf and accelerate:

    python gguf_to_hf.py MODEL.gguf OUT_DIR

The file is self-contained on purpose: it must not import scalellm.
transformers dequantizes the GGUF tensors on load; the resulting config still
carries a ``quantization_config`` (and the model a GGUF quantizer) describing
the GGUF origin, which would block saving and mislead vLLM, so both are dropped.
"""

import os
import sys


def convert(gguf_path: str, out_dir: str) -> None:
    """Write config, bf16 safetensors and tokenizer for ``gguf_path`` into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    # The weights are plain bf16 now; forget that they came from a quantized file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    partial = out_dir + ".partial"
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: gguf_to_hf.py MODEL.gguf OUT_DIR")
    convert(sys.argv[1], sys.argv[2])
