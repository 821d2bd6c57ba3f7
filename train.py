"""Fine-tune a 🤗 Transformers classifier. `accelerate launch train.py [recipe.yaml] [--option value ...]`;
with no arguments, MiniLM-L6 on BBC News, offline. `python train.py --help` lists every option."""

from tuneloop.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
