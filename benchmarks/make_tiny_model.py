"""A tiny BERT (2 layers of 32) with the built-in MiniLM's tokenizer: run through speed.py, a step is almost no
arithmetic, so the table compares what each loop costs per step besides the model (Python, bookkeeping, data).

    .venv/bin/python benchmarks/make_tiny_model.py /tmp/tiny-minilm
    .venv/bin/python benchmarks/speed.py --workload short --model /tmp/tiny-minilm
        --settings "T2b T2 + bf16" "tuneloop same maths"
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tuneloop import model as models  # noqa: E402
from tuneloop.options import BUILTIN_MODEL  # noqa: E402

folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path(BUILTIN_MODEL))
torch.manual_seed(0)
config = BertConfig(
    vocab_size=tokenizer.vocab_size,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
    pad_token_id=tokenizer.pad_token_id,
)
BertModel(config).save_pretrained(folder)  # the encoder only: each run builds its own classifier head
tokenizer.save_pretrained(folder)
print(folder)
