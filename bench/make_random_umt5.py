"""Write a umT5-XXL-shaped text encoder with random weights as a local Hugging Face folder.

The folder is what `--text-encoder DIR` reads for a real umT5-XXL (config.json + safetensors of
a `UMT5EncoderModel`, plus tokenizer files), so a benchmark measures the real load and encode
path of the 5.7 B-parameter encoder without the published weights. The tokenizer is a word-level
stand-in (ids inside umT5's 256384-entry vocabulary): an encode runs over the padded 512 positions
whatever the tokens are, so its cost is that of the real encoder.

    PYTHONPATH=src python bench/make_random_umt5.py /tmp/umt5-xxl --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from streamdit.model.umt5 import UMT5_XXL_SHAPE, UMT5TextEncoder

WORDS = 30000  # stand-in vocabulary (umT5's is 256384 entries)


def write_tokenizer(folder: Path) -> None:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_tokenizer(args.folder)
    encoder = UMT5TextEncoder.from_config(
        UMT5_XXL_SHAPE, args.folder, seed=args.seed, device=args.device, dtype=torch.bfloat16
    )
    t1 = time.perf_counter()
    encoder.model.save_pretrained(args.folder)
    params = sum(p.numel() for p in encoder.model.parameters())
    t2 = time.perf_counter()
    print(json.dumps({"folder": str(args.folder), "params": params, "init_s": t1 - t0, "save_s": t2 - t1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
