"""Moved to `first-gguf routers ship` (first_gguf/convert/ship.py); kept as a wrapper for tests/test_bypass.py."""
import sys; from first_gguf.cli import main; main(["routers", "ship", *sys.argv[1:]], prog_name="first-gguf")  # noqa: E702,E401
