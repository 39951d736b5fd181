"""Inference, the ground serving, batch scoring and the audit all stand on: an exported model in a CPU
runtime (`runtime`), and how its probabilities become verdicts on a recorded count (`verdict`, with the
conformal calibration in `conformal`). Nothing here imports torch, FastAPI or Ray."""
