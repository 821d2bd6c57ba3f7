"""tuneloop: fine-tune 🤗 Transformers classifiers with a plain PyTorch loop prepared by 🤗 Accelerate."""

__version__ = "0.1.0"
