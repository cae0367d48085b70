"""Moved to `first-gguf routers from-checkpoint` (first_gguf/train/from_checkpoint.py); a wrapper for tests/test_decode_lora.py."""
import sys; from first_gguf.cli import main; main(["routers", "from-checkpoint", *sys.argv[1:]], prog_name="first-gguf")  # noqa: E702,E401
