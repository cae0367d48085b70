"""Moved to research/oracle_sets.py; this wrapper stays while tests/test_measures.py loads it from here."""
import pathlib, runpy; globals().update(runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "research" / "oracle_sets.py"), run_name=__name__))  # noqa: E401,E702,E501
