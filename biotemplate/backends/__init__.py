"""Storage backends: the Backend protocol and its implementations."""
