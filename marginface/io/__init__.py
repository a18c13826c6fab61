"""Low-level file handling shared by every writer and loader: atomic writes (`atomic`) and the
check that a model file would run code when loaded (`trust`). Imports nothing from the rest of
marginface except `marginface.errors`."""
