"""Built-in components for the five hook points: samplers, estimators, losses, rewards, replay."""
