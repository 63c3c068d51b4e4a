"""The trial test suite."""
