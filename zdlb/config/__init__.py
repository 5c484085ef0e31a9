"""Configuration: the frozen model (model.py) and the TOML loader that validates it (load.py)."""
