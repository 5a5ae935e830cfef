"""Screens and dialogs: warm-up, new experiment, confirm, clone, export, help."""
