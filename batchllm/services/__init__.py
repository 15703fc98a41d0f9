"""Use cases the CLI calls: submit, export, status views, the embedded runner."""
