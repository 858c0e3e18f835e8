"""The measuring behind the ``gradtx`` command-line tool: ``compare`` (digits training) and ``bench`` (update and end-to-end benchmarks)."""
