"""Model side: noise schedules, the policy adapter over diffusers video models, presets."""
