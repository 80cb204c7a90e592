"""What the user asks for: recipes (config, recipe files), the per-site plan and initial values."""
