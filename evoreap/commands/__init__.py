"""Sub-commands of the ``evoreap`` CLI (one module each)."""
