"""Loading models: specs, the zoo, the architecture registry, checkpoint files."""
