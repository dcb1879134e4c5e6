"""``more-fl bench``: the plaintext vs encrypted step table (``steps``) and, with ``--suite
full``, the benchmark suite (``suite``: one module per section, the plots and the markdown)."""
