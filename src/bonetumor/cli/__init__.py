"""The ``bonetumor`` command line: one command per stage (``main``), data commands (``data``), helpers (``common``)."""
