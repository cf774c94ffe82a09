"""The engine's lifecycle: the supervisor that owns it, the rules of what may happen in which phase, and its
process."""
