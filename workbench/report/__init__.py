"""The HTML and Markdown report with its plots.

inputs (results files and run records in), tables (cell formatting, the summary), plots (the
figures), build (`build_report`: the pages from templates/).
"""
