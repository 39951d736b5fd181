"""Batch scoring of many photos (`binsight predict`, and the scoring behind `binsight audit`): a
manifest or prefix cut into Parquet shards, resumable, in one process or on Ray Data."""
