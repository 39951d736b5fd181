"""Retrain, compare with production on a fixed test split, promote only if better."""
