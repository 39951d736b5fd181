"""binsight: count objects in warehouse bin photos and flag bins that disagree with inventory."""

__version__ = "0.1.0"
