"""What every floor shares: settings from dataclasses, redaction, storage paths, the annotate schema."""
