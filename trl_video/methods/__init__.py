"""Built-in reference methods (third-party methods live in plugins/)."""
