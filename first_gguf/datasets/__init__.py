"""The data first-gguf trains and evaluates on, fetched and cached at run time (no dataset text is stored in
the repository):

- ``tasks``: the training/evaluation tasks (examples with references), their splits, extra JSON Lines data.
- ``broad``: broad and chat prompts for on-policy training (no references).
- ``heldout``: held-out-by-source prompt sets, evaluation only.
- ``common``: what they share: the example record, reserved names, the data cache, the BIG-bench sdist, the
  gettext catalogues, the standard-library docstrings.

Each module imports only ``common`` (and ``tasks`` nothing but ``common``): no cycle, and none of them imports
the runtime or the rest of first_gguf.
"""
