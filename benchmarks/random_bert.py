"""Randomly initialised BERT MLMs of the benchmark sizes, saved with a tokenizer:

    python benchmarks/random_bert.py OUT_DIR [--tokenizer PATH] [--sizes minilm,bert-base,bert-large]

writes OUT_DIR/<size>/ (HF format). Throughput does not depend on the weights, so the GPU
benchmark (benchmarks/gpu.sh) needs no download. Default tokenizer: the embedded model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # hidden, layers, heads, ffn
    "minilm": (384, 6, 12, 1536),
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--sizes", default=",".join(SHAPES))
    parser.add_argument("--tiny", action="store_true",
                        help="every size at a tiny shape (a CPU dry run of the GPU scripts)")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    if args.tokenizer is None:
        from mlmkit.model.checks import embedded_model_path
        args.tokenizer = str(embedded_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    for size in args.sizes.split(","):
        out = Path(args.out_dir) / size
        if (out / "config.json").is_file():
            continue
        hidden, layers, heads, ffn = (32, 2, 2, 64) if args.tiny else SHAPES[size]
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn,
                            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print(f"{out}: {size}, {model.num_parameters() / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
