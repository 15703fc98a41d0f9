"""``python -m batchllm`` runs the CLI."""

from batchllm.cli import main

if __name__ == "__main__":
    main()
