"""The re-check loop: people recount the bins binsight flags, and the recounts become training labels."""
