"""The synthetic shapes world (../shared/DEMO_WORLD.md) and the training of the bundled demo model."""
