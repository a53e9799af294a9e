"""Text for calibration and evaluation: named datasets (hub or local copies), files, self-generated."""
