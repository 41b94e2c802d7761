"""Evaluation: predictions CSVs -> the study's statistics, tables, plots and the HTML report."""
