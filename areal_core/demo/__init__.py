"""The built-in demo: its base model, built in code and cached (``base_model``)."""
