"""Merge the LoRA adapter into the base weights and save a standalone HF model folder."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from handlers import modelio
from trainbox.errors import StageFailed

log = logging.getLogger(__name__)

SP_MODEL = "tokenizer.model"


def saved_dtype(base_config: Any) -> Any:
    """The dtype the base checkpoint was stored in (merged weights keep it; float32 when unknown)."""
    import torch

    name = str(getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name.replace("torch.", ""), torch.float32)


def merge_adapter(base_model_path: str, adapter_dir: Path, tokenizer_dir: Path, out_dir: Path,
                  device: str = "cpu") -> tuple[Any, Any]:
    """Load base + adapter, ``merge_and_unload`` in float32, save weights (safetensors), tokenizer and
    generation config to ``out_dir``. Returns the merged model (float32, eval mode) and the tokenizer."""
    import torch
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise StageFailed(f"{adapter_dir} holds no adapter_config.json: the train stage's adapter is incomplete; "
                          "retry the job so train runs again")
    tokenizer = modelio.load_tokenizer(tokenizer_dir)
    base = modelio.load_causal_lm(base_model_path, device=device, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers import AutoConfig

    dtype = saved_dtype(AutoConfig.from_pretrained(str(base_model_path)))  # loading in float32 rewrote base.config
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if dtype is torch.float32:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
        model.to(torch.float32)
    tokenizer.save_pretrained(out_dir)
    for src in (Path(tokenizer_dir), Path(base_model_path)):
        if (src / SP_MODEL).is_file() and not (out_dir / SP_MODEL).exists():
            shutil.copy2(src / SP_MODEL, out_dir / SP_MODEL)  # real SentencePiece scores for the GGUF
    log.info("merged %s + %s into %s (%s)", base_model_path, adapter_dir, out_dir, str(dtype).replace("torch.", ""))
    return model.to("cpu"), tokenizer
