"""Watching a served model: what its photos and answers look like now against its baseline."""
