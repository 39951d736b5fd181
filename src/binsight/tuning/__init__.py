"""Hyperparameter search with Optuna, shared across worker processes and machines."""
