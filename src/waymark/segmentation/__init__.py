"""Audiences: one segment language, its checker and its evaluators (SQL, in memory, streaming).

``lang`` holds the AST, the text and JSON forms and the checker; ``compile`` lowers a checked
AST to each evaluator. Both are pure: no database, clock or network.
"""
