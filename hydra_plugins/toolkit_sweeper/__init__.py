"""The toolkit's Hydra sweeper (``model_sweeper.ModelSweeper``): Hydra loads plugins from this namespace only."""
