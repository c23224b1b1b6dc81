"""What the ``loopserve`` command line needs besides composing a config: per-command help,
command-line-only arguments (``prompt=``, ``input_ids=``), early checks that run before any
heavy import, and safe printing of generated text to a terminal."""
