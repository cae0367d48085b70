"""``python -m first_gguf.train [options]``: the entry point for torchrun / accelerate launch, with the options
of ``first-gguf train``. The command line (first_gguf.cli) imports the training package, never the reverse."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun / accelerate launch: python -m first_gguf.train [options]."""
    from ..cli import train as train_cmd

    train_cmd.main(args=argv, prog_name="first_gguf.train", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main()
