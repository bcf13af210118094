"""The HTML and Markdown report with its plots.

inputs (results files, run records and compare.json in), matched (forgetting at matched learning:
a compare.json's table or one computed with workbench.compare), families (entries as compare's
families and fronts), tradeoff (the learning-vs-forgetting fronts), tables (cell formatting, the
summary), plots (the other figures), build (`build_report`: the pages from templates/).
"""
