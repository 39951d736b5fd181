"""Self-contained HTML reports (figures embedded), readable offline and attachable to a ticket."""
