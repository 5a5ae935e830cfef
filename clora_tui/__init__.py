"""clora-tui: the Textual app and the command line; a client of the engine only."""
