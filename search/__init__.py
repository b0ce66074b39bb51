"""search/: Optuna studies over merge Recipes, and the `mergesearch` command."""
