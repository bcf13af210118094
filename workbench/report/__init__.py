"""The HTML and Markdown report with its plots."""
